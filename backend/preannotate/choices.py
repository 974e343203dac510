"""The values of the pre-annotation options (`mode`, `boxes_from`, `output`): their one
definition, light enough for the CLI's parser (backend.cli_parsers) to import without torch."""

MODES = ("boxes", "auto")
OUTPUTS = ("auto", "brush", "polygon")
SOURCES = ("annotation", "prediction")
