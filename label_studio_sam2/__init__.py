"""label-studio-sam2: Meta's SAM2 as a Label Studio ML backend.

Layers, each importing only the ones below it (tests/test_structure.py):

- `engine`: the model (SAM2 through `transformers`), predictors, embedding store, video tracker,
  fine-tuning math. No Flask, no Label Studio, no settings.
- `service`: settings, the runtime (composition root), segmentation, video tracking, bulk jobs,
  media fetching, metrics, admission, errors.
- `labelstudio`: the Label Studio adapter: the Flask app, the protocol, the API client, Retrieve.
- `cli`: every subcommand's parser and entry point.
"""
