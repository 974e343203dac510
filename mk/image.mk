# The container image, built from the Dockerfile and run, on machines with or without Docker.
# Included from the Makefile. Targets:
#   make image       the CPU image $(IMAGE) (tools/build_image.sh: Docker where `docker info`
#                    answers, else Debian's buildah with chroot isolation on a debian:bookworm-slim
#                    made by debootstrap, tools/image_base.sh)
#   make image-test  builds it with buildah, then runs it for real (tests/image, marker `image`):
#                    its gunicorn under its own user with the real Label Studio, its worker with a
#                    real redis-server
#   make clean-image forget the built image (the base image and cached layers stay)
# Needs root (debootstrap, buildah's store): CI and the dev machines run as root; elsewhere sudo.
IMAGE ?= label-studio-sam2:cpu
BUILDAH := /usr/bin/buildah
DEBOOTSTRAP := /usr/sbin/debootstrap
HAS_DOCKER = $(shell command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1 && echo yes)

.PHONY: image image-test buildah clean-image

$(BUILDAH) $(DEBOOTSTRAP):
	@echo "Installing Debian's buildah and debootstrap (the image is built and run without a Docker engine)..."
	$(SUDO) apt-get update -q >/dev/null
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q buildah debootstrap >/dev/null
	@$(BUILDAH) --version

buildah: $(BUILDAH) $(DEBOOTSTRAP)

image: venv $(if $(HAS_DOCKER),,buildah)
	$(SUDO) bash tools/build_image.sh $(IMAGE) $(BIN)/python

# The test runs the image with buildah, so it is built with buildah even where Docker is.
image-test: venv buildah ls-venv redis-server
	$(SUDO) env IMAGE_BUILDER=buildah bash tools/build_image.sh $(IMAGE) $(BIN)/python
	SAM2_IMAGE=$(IMAGE) $(BIN)/python -m pytest -m image tests/image

clean-image:
	-$(SUDO) $(BUILDAH) rmi $(IMAGE)
