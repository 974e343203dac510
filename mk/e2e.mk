# Label Studio end to end: the real server in its own virtualenv, Debian's Chromium, the demo.
# Included from the Makefile. Targets:
#   make run            Label Studio + the SAM2 backend + a demo project, until Ctrl-C
#                       (MODEL=dir|.pt|short name|test, LS_PORT=8080, BACKEND_PORT=9090)
#   make test-e2e       only the E2E tests (tests/e2e, marker e2e)
#   make e2e-deps       Label Studio in .venv-ls, Chromium and redis-server, what the tests need
#   make clean-e2e      forget .venv-ls, the demo's data (.run/) and test-output/e2e/
LS_VERSION := 1.23.2
LS_VENV := .venv-ls
LS_STAMP := $(LS_VENV)/.installed-label-studio-$(LS_VERSION)
CHROMIUM := /usr/bin/chromium
REDIS_SERVER := /usr/bin/redis-server
# apt-get needs root: CI and the dev machines run as root; elsewhere go through sudo.
SUDO := $(shell test "$$(id -u)" = 0 || echo sudo)

.PHONY: run ls-venv chromium redis-server e2e-deps test-e2e clean-e2e

$(LS_STAMP):
	LS_VERSION=$(LS_VERSION) bash tools/install_ls.sh $(LS_VENV)

ls-venv: $(LS_STAMP)

$(CHROMIUM):
	@echo "Installing Debian's chromium (the browser tests drive it; no browser is downloaded)..."
	$(SUDO) apt-get update -q >/dev/null
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium fonts-liberation >/dev/null
	@$(CHROMIUM) --version

chromium: $(CHROMIUM)

# The scale-out tests (REDIS_URL, RQ workers) start their own redis-server on a loopback port.
$(REDIS_SERVER):
	@echo "Installing Debian's redis-server (the scale-out tests start it; no service is enabled)..."
	$(SUDO) apt-get update -q >/dev/null
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q redis-server >/dev/null
	@$(REDIS_SERVER) --version

redis-server: $(REDIS_SERVER)

e2e-deps: ls-venv chromium redis-server

# `make test` runs the E2E tests with the rest; these are what they need beforehand.
test: e2e-deps

test-e2e: venv e2e-deps
	$(BIN)/python -m pytest -m e2e tests/e2e

run: venv ls-venv
	$(BIN)/python tools/demo.py $(if $(MODEL),--model $(MODEL))

clean-e2e:
	rm -rf $(LS_VENV) .run test-output/e2e
