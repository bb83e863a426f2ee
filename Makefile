# Racklet OS. `make variant=qemu-x86_64 build`, `make test`; see README.md.

variant ?= qemu-x86_64
# k3s in the image: default (what the variant says), official, stand-in, none.
K3S ?= default
OUTPUT ?= build
# Signing keys (development keys by default: outside the work tree, never in git).
KEYS ?= $(HOME)/.config/racklet/dev-keys
# The TUF repository `publish` adds builds to.
REPO ?= $(OUTPUT)/repo
# Build this image version instead of the variant's (e.g. VERSION=0.2.0).
VERSION ?=
# Extra recipes after the variant's (tests only, e.g. EXTRA_RECIPES=test-failing-health).
EXTRA_RECIPES ?=
# Where nodes look for updates (default: the variant's [update] section).
METADATA_URL ?=
TARGETS_URL ?=
# Rollout waves for publish, e.g. WAVES="512@+0h 2048@+1d" (default: all nodes at once).
WAVES ?=

SHELL := /bin/bash
CARGO ?= cargo
CARGO_HOME ?= $(HOME)/.cargo
arch := $(shell sed -n 's/^arch = "\(.*\)"/\1/p' variants/$(variant)/variant.toml 2>/dev/null)
ifeq ($(arch),aarch64)
  triple := aarch64-unknown-linux-gnu
else
  triple := x86_64-unknown-linux-gnu
endif
# The image's timestamps: the last commit's time, else (no git) the variant's version.
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null)
ifneq ($(SOURCE_DATE_EPOCH),)
export SOURCE_DATE_EPOCH
else
unexport SOURCE_DATE_EPOCH
endif

# Binaries that go into images are built with paths remapped (the checkout to
# /racklet, cargo's home to /cargo), so two checkouts in different directories
# produce identical bytes. Through a rustc wrapper, not RUSTFLAGS: cargo hashes
# RUSTFLAGS into every crate's metadata, so a checkout path there would make the
# dependencies' bytes and cargo's fingerprints differ between checkouts
# (image-builder/scripts/rustc-remap).
image_cargo_env := RUSTC_WRAPPER=$(CURDIR)/image-builder/scripts/rustc-remap \
  RACKLET_REMAP_SOURCE=$(CURDIR) RACKLET_REMAP_CARGO_HOME=$(CARGO_HOME)
builder := target/release/racklet-image
# The builder is compiled with the image binaries' flags into their target
# directory (then copied to $(builder)): the dependencies they share (tokio,
# tough, rustls, zstd...) are compiled once, not twice.
host_triple := $(shell rustc -vV 2>/dev/null | sed -n 's/^host: //p')
# When the image's arch is the host's, the builder and the image binaries are
# one cargo build of the whole workspace: cargo resolves features per set of
# packages, so building them apart compiled tokio, rustls, reqwest, tough...
# twice with different features; and `make unit` (cargo test --workspace, the
# same set) then finds them all built. Another arch: the builder alone, unless
# BUILDER_PACKAGES=--workspace (tests/run-all.sh: its x86_64 images built the
# builder that way already; `-p image-builder` would resolve other features and
# compile and link the builder again, a minute and a half).
ifeq ($(triple),$(host_triple))
  BUILDER_PACKAGES ?= --workspace
else
  BUILDER_PACKAGES ?= -p image-builder
endif
k3s_flag := $(if $(filter stand-in,$(K3S)),stand-in,$(K3S))

.PHONY: keys publish build lock host-tools image-binaries builder test test-unit unit test-repo test-agent lint fmt-check clippy test-image test-boot run bench bench-delta clean check-variant images e2e soak

check-variant:
	@test -f variants/$(variant)/variant.toml || { echo "no variant '$(variant)'; expected variants/$(variant)/variant.toml"; exit 2; }

host-tools: check-variant
	@image-builder/scripts/host-tools.sh $(arch)

builder:
	$(image_cargo_env) $(CARGO) build --release --locked $(BUILDER_PACKAGES) --target $(host_triple) --target-dir target/image
	@cmp -s target/image/$(host_triple)/release/racklet-image $(builder) || { \
	  install -D -m 0755 target/image/$(host_triple)/release/racklet-image $(builder).new && mv -f $(builder).new $(builder); }

# Another arch: only the binaries the image ships (packages/racklet-agents.toml),
# not the TUF conformance client.
image_bins := --bin racklet-update --bin racklet-node
# Another arch's binaries compile in target directories of their own: cargo
# locks a whole target directory, and tests/run-all.sh compiles the aarch64
# binaries while the x86_64 build holds target/image (filling the CPU that
# build leaves idle).
image_dir := $(if $(filter $(triple),$(host_triple)),target/image,target/image-$(triple))
init_dir := $(if $(filter $(triple),$(host_triple)),target/init,target/init-$(triple))

image-binaries: host-tools
	$(image_cargo_env) $(CARGO) build --release --locked \
	  $(if $(filter $(triple),$(host_triple)),--workspace,-p update-agent -p racklet-node $(image_bins)) --target $(triple) --target-dir $(image_dir)
	RUSTFLAGS="-C target-feature=+crt-static" $(image_cargo_env) $(CARGO) build --release --locked -p racklet-init --target $(triple) --target-dir $(init_dir)

build: host-tools builder image-binaries
	$(builder) build --variant $(variant) --output $(OUTPUT) \
	  --binaries $(image_dir)/$(triple)/release \
	  --init $(init_dir)/$(triple)/release/racklet-init \
	  --k3s $(k3s_flag) \
	  $(if $(VERSION),--image-version $(VERSION)) \
	  $(foreach recipe,$(EXTRA_RECIPES),--extra-recipe $(recipe)) \
	  $(if $(wildcard $(KEYS)/root.json),--tuf-root $(KEYS)/root.json) \
	  $(if $(METADATA_URL),--metadata-url $(METADATA_URL)) \
	  $(if $(TARGETS_URL),--targets-url $(TARGETS_URL))

# Development signing keys for the four TUF roles, and root version 1.
keys: builder
	@if [ -f "$(KEYS)/root.json" ]; then echo "keys already in $(KEYS) (kept as they are)"; \
	else $(builder) keys generate --dir $(KEYS); fi

# Build (if needed) and add this variant's version to $(REPO), signed.
publish: keys build
	$(builder) publish --build $(OUTPUT)/$(variant) --repo $(REPO) --keys $(KEYS) \
	  $(foreach wave,$(WAVES),--wave $(wave))

lock: check-variant builder
	$(builder) lock --variant $(variant)

# The README's test command: every test group, each image built once, VM
# tests two at a time; ends with a table of stage times and image identities
# (tests/run-all.sh).
test:
	@image-builder/scripts/host-tools.sh x86_64
	@image-builder/scripts/host-tools.sh aarch64
	@image-builder/scripts/vm-tools.sh
	@image-builder/scripts/test-tools.sh
	tests/run-all.sh

test-unit: lint unit

# The unit tests, in release mode in the image binaries' target directory with
# their flags and package set (--workspace, see BUILDER_PACKAGES): after an
# x86_64 image build every dependency is compiled already, only the test
# harnesses are left (a debug build would compile all of them again).
unit:
	@image-builder/scripts/host-tools.sh x86_64
	@image-builder/scripts/test-tools.sh
	RACKLET_REQUIRE_PROMTOOL=1 $(image_cargo_env) $(CARGO) test --release --locked --workspace \
	  --target $(host_triple) --target-dir target/image

# The agent's daemon on a private D-Bus: slots in a disk file, a repository on 127.0.0.1.
test-agent:
	@image-builder/scripts/test-tools.sh
	tests/agent/run.sh

# The publisher's repository read by a second TUF client (python-tuf).
test-repo: builder
	@image-builder/scripts/test-tools.sh
	RACKLET_IMAGE=$(builder) tests/repo/run.sh

lint: fmt-check clippy

fmt-check:
	$(CARGO) fmt --all --check

# clippy in the image binaries' target directory with their profile, package
# set and flags (like `unit`): the build scripts (aws-lc-sys and zstd-sys
# compile C) and proc macros an image build ran and compiled are reused.
clippy:
	$(image_cargo_env) $(CARGO) clippy --release --workspace --all-targets --locked \
	  --target $(host_triple) --target-dir target/image -- -D warnings

test-image: builder
	@image-builder/scripts/host-tools.sh aarch64
	tests/image/run.sh

# Tests that boot images in QEMU (TCG): x86_64 under OVMF, the rpi4 path under
# U-Boot; they boot version 1.0.0 of `make images`.
test-boot: images
	@image-builder/scripts/vm-tools.sh
	python3 tests/vm/test_boot.py --build $(E2E)/v1

# Boot build/<variant>/disk.img on the serial console, on a copy-on-write overlay
# (the built image stays pristine) with fresh UEFI variables each time.
run: check-variant
	@image-builder/scripts/vm-tools.sh
	image-builder/scripts/run-image.sh $(variant)

bench: builder
	tests/bench/build-times.sh

# Delta updates against full ones (tests/bench/delta.sh; outside CI, ~14 min):
# an agent change, a Debian security update, a kernel update.
bench-delta: builder
	tests/bench/delta.sh

clean:
	rm -rf $(OUTPUT)

# Every image the VM tests boot, built once: versions 1.0.0, 2.0.0 and 3.0.0
# (3.0.0 with a health check that always fails) of each of $(E2E_VARIANTS),
# into $(E2E)/v{1,2,3}/<variant>, trusting throwaway keys made in $(E2E)/keys.
E2E ?= build/e2e
E2E_VARIANTS ?= qemu-x86_64 qemu-aarch64
e2e_make = $(MAKE) KEYS=$(abspath $(E2E))/keys

images: builder
	$(e2e_make) keys
	@set -e; for variant in $(E2E_VARIANTS); do \
	  $(e2e_make) variant=$$variant build OUTPUT=$(E2E)/v1 VERSION=1.0.0 EXTRA_RECIPES=; \
	  $(e2e_make) variant=$$variant build OUTPUT=$(E2E)/v2 VERSION=2.0.0 EXTRA_RECIPES=; \
	  $(e2e_make) variant=$$variant build OUTPUT=$(E2E)/v3 VERSION=3.0.0 EXTRA_RECIPES=test-failing-health; \
	done

# End-to-end updates in QEMU (tests/vm/test_e2e.py): the images above published
# in turn to a repository served on 127.0.0.1 and installed by the real agent,
# on x86_64 (systemd-boot) and on aarch64 (U-Boot, the rpi4 boot path).
# `make soak COUNT=N [variant=...]`: N power cuts at random moments.
COUNT ?= 5

e2e: images
	@image-builder/scripts/vm-tools.sh
	@image-builder/scripts/test-tools.sh
	@status=0; for variant in $(E2E_VARIANTS); do \
	  python3 tests/vm/test_e2e.py --variant $$variant --builds $(E2E) --no-build || status=1; \
	done; exit $$status

# COUNT power cuts at random moments (install, first boot, commit), split over
# both boot paths ($(E2E_VARIANTS)); ends with the total "N passed, N failed".
soak: builder
	@image-builder/scripts/vm-tools.sh
	@set -e; mkdir -p build; variants="$(E2E_VARIANTS)"; n=$$(echo $$variants | wc -w); passed=0; failed=0; \
	for variant in $$variants; do \
	  count=$$(( $(COUNT) / n )); [ "$$count" -gt 0 ] || count=1; \
	  python3 tests/vm/test_e2e.py --variant $$variant --builds $(E2E) --only powercut --count $$count \
	    | tee build/soak-$$variant.log || true; \
	  line=$$(grep -E '^power cuts: [0-9]+ passed, [0-9]+ failed' build/soak-$$variant.log | tail -n 1); \
	  p=$$(echo "$$line" | sed -E 's/.* ([0-9]+) passed.*/\1/'); f=$$(echo "$$line" | sed -E 's/.* ([0-9]+) failed.*/\1/'); \
	  [ -n "$$line" ] || { p=0; f=$$count; }; \
	  passed=$$((passed + p)); failed=$$((failed + f)); \
	done; echo "soak: $$passed passed, $$failed failed"; [ "$$failed" -eq 0 ]
