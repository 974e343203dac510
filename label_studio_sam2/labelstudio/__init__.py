"""The Label Studio adapter: the only subpackage that imports Flask or `label_studio_sdk`."""
