"""The values of the pre-annotation options (`mode`, `boxes_from`, `output`): their one
definition, light enough for the CLI's parser (label_studio_sam2.cli.parsers) to import without torch."""

MODES = ("boxes", "auto")
OUTPUTS = ("auto", "brush", "polygon")
SOURCES = ("annotation", "prediction")
