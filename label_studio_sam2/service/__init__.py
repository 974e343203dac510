"""The tool-neutral service: settings, the runtime, segmentation, video, bulk jobs, media, metrics."""
