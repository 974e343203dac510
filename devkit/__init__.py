"""Development kit: what tests, tools (the demo, the fixture trainer) and benchmarks share, so
none of them imports `tests/` and the product imports none of it.

- `scenes`: synthetic scenes and clips of coloured shapes (training and testing the tiny SAM2).
- `videos`: moving-shape videos written to disk (video tests and the video benchmark).
- `sample_media`: the demo's and the E2E tests' sample images and videos.
- `lsserver`: a real Label Studio server (from .venv-ls) and the backend, started and wired
  together; `ls_bootstrap.py` runs inside Label Studio's virtualenv.
- `gunicorn`: the backend under gunicorn as the Docker image runs it; `redis_server`: a real
  redis-server on a loopback port.
- `sam2-shapes/`: the tiny SAM2 trained on synthetic shapes (`make-test-model --trained`).
"""
