"""The model side: SAM2 through `transformers`; imports no Flask, no Label Studio, no settings."""
