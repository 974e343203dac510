"""The E2E session fixtures (one real Label Studio, the tiny trained model) for the image tests."""

from tests.e2e.conftest import backend_model_dir, e2e_output_dir, label_studio

__all__ = ["backend_model_dir", "e2e_output_dir", "label_studio"]
