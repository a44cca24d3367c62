# Two commands for a fresh Debian / Raspberry Pi OS machine: `make demo`, `make test`.
# Each installs what is missing first: a venv from the requirements files and
# Debian's mosquitto, tinyproxy, softhsm2, opensc-pkcs11 and faketime (with sudo when not root).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV_VERSION ?= 0.13.9
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq

# Installation on a device (`make install`) or into an image's staging tree
# (`make install DESTDIR=/path/to/rootfs`, which calls no systemctl).
# systemctl only talks to a running systemd: in an image's chroot (pi-gen, a
# plain `make install` there) the unit is enabled by its symlink instead, as
# Debian's deb-systemd-helper decides, by this folder's existence.
SYSTEMD_RUNDIR ?= /run/systemd/system
PREFIX ?= /opt/entomologist
UNITDIR ?= /etc/systemd/system
UNIT := entomologist-provision.service
INSTALL_PYTHON ?= /usr/bin/python3
# KEY_STORAGE "pkcs11": PKCS11=softhsm or PKCS11=tpm2 also installs that drop-in,
# which opens the token's store to the unit's sandbox.
PKCS11 ?=
# A read-only root with the config and CERT_DIR on a data partition:
# DATA_DIR=/data/entomologist also installs the drop-in that makes that folder
# writable inside the unit's sandbox.
DATA_DIR ?=
APP_FILES := boot.py update_boot_status.py AmazonRootCA1.pem requirements.txt README.md
# The scripts' shared package; the stand-in (iot_standin.py, standin/) stays off the device.
PACKAGE_FILES := $(wildcard entomologist/*.py)

# PyPI has no awscrt (nor python-pkcs11, cffi) wheel for 32-bit ARM (armhf, armv6): pip
# then compiles them, which needs these (see README, "32-bit boards").
BUILD_DEPS := build-essential cmake python3-dev libffi-dev

.PHONY: setup mosquitto tinyproxy faketime softhsm2 systemd-analyze demo test test-slow bench mutation clean install install-venv install-libraries uninstall image-tools image-test system-tools system-test

# What `venv --clear` (setup) and `rm -rf` (clean) may take as VENV: nothing, or a venv
# (a pyvenv.cfg and only what a venv holds), never a link; a path the shell would split
# or read otherwise is refused too. Else exit 2, nothing emptied.
VENV_CHECK = case "$(VENV)" in ""|*[!A-Za-z0-9._/+@:=,~-]*) echo "VENV=\"$(VENV)\" may hold only" \
		"letters, digits and . _ / + @ : = , ~ -" >&2; exit 2;; esac; \
	other=; if [ -L "$(VENV)" ]; then other="it is a link"; elif [ -e "$(VENV)" ]; then \
		for e in "$(VENV)"/* "$(VENV)"/.[!.]* "$(VENV)"/..?*; do \
		[ -e "$$e" ] || [ -L "$$e" ] || continue; \
		[ -e "$(VENV)/pyvenv.cfg" ] || { other="it has no pyvenv.cfg"; break; }; \
		case "$${e\#\#*/}" in bin|include|lib|lib64|share|etc|pyvenv.cfg|.installed|.gitignore|.lock) ;; \
			*) other="it holds $${e\#\#*/}, which no venv holds"; break;; esac; done; fi; \
	if [ -n "$$other" ]; then echo "$(VENV) is not a venv this Makefile made ($$other):" \
		"setup would empty it, clean remove it; remove it yourself or choose another VENV=" >&2; \
		exit 2; fi

setup: $(VENV)/.installed mosquitto tinyproxy faketime softhsm2 systemd-analyze

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { $(SUDO) apt-get update -qq && $(APT_INSTALL) python3-venv; }
	@# uv fetches and installs the wheels in parallel: the venv is ready in half
	@# the time pip takes. The machine's own pip (22.3 or later), where it has one,
	@# puts uv into a venv made without pip: ensurepip alone takes longer than uv's
	@# whole install. Otherwise the venv gets its pip from ensurepip.
	@# Made from empty whenever this rule has not finished it: a run cut short (Ctrl-C,
	@# a full disk, a power cut) can leave a package half copied whose metadata says it
	@# is installed, and neither pip nor uv would install it again. --clear empties the
	@# folder, so only a venv (or an empty folder), never a link, is taken: a folder
	@# with a pyvenv.cfg and anything a venv does not hold (a checkout someone made a
	@# venv with `python -m venv .`) is refused. Unquoted below, a blank would split
	@# the path in two (`venv --clear data x` empties ./data).
	@$(VENV_CHECK)
	$(PYTHON) -m venv --clear --without-pip $(VENV)
	$(PYTHON) -m pip --python $(PY) install -q --disable-pip-version-check uv==$(UV_VERSION) 2>/dev/null || \
		{ $(PY) -m ensurepip --default-pip >/dev/null && $(PY) -m pip install -q --disable-pip-version-check uv==$(UV_VERSION); }
	$(PY) -m uv pip install -q --python $(PY) -r requirements.txt -r requirements-dev.txt
	touch $@

mosquitto:
	@command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || { $(SUDO) apt-get update -qq && $(APT_INSTALL) mosquitto; }

# The HTTP_PROXY tests start their own tinyproxy in the foreground. The package
# also starts one as a service on port 8888 where there is an init; the tests
# do not use it.
tinyproxy:
	@command -v tinyproxy >/dev/null || [ -x /usr/sbin/tinyproxy ] || { $(SUDO) apt-get update -qq && $(APT_INSTALL) tinyproxy; }

# The --check test of a clock in the past runs boot.py under libfaketime, as a board
# without a real-time clock sees the time.
faketime:
	@command -v faketime >/dev/null || { $(SUDO) apt-get update -qq && $(APT_INSTALL) faketime; }

# The PKCS#11 key storage tests: SoftHSM2 stands in for a TPM or a secure element,
# and OpenSC's pkcs11-spy (in opensc-pkcs11) records the calls made to it.
softhsm2:
	@dpkg -s softhsm2 opensc-pkcs11 >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(APT_INSTALL) softhsm2 opensc-pkcs11; }

# The unit's tests need systemd-analyze (Debian's systemd package); containers may lack it.
systemd-analyze:
	@command -v systemd-analyze >/dev/null || { $(SUDO) apt-get update -qq && $(APT_INSTALL) systemd; }

demo: setup
	$(PY) iot_standin.py demo

# pytest-xdist: most of the suite waits on processes, sockets and deadlines, not
# on the CPU, so two workers per core; TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= $(shell echo $$(( $$(nproc 2>/dev/null || echo 1) * 2 )))

# The suite starts hundreds of boot.py and stand-in processes: each keeps what it
# compiles, so that the next one does not compile the project and its libraries
# again (a PYTHONDONTWRITEBYTECODE in the environment would forbid it).
test: setup
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) --dist worksteal

# Cases that wait on a deliberate delay (a server certificate from an unknown CA
# fails only after the TLS library's 10-30 s delay): kept out of `make test`.
test-slow: setup
	$(PY) -m pytest -m slow

# Benchmarks print tables and write bench/results/*.json; they never fail on a slow machine.
bench: setup
	@[ -x /usr/bin/time ] || { $(SUDO) apt-get update -qq && $(APT_INSTALL) time; }
	@command -v ip >/dev/null || [ -x /usr/sbin/ip ] || { $(SUDO) apt-get update -qq && $(APT_INSTALL) iproute2; }
	# Network namespaces and TUN devices: root.
	$(SUDO) $(PY) bench/delay_line.py
	$(PY) bench/device_cost.py
	$(PY) bench/fleet.py
	$(PY) bench/pkcs11_cost.py
	$(PY) bench/check_time.py

# A sampled mutation run over boot.py, update_boot_status.py and entomologist/ (bench/MUTATION.md):
# one coverage pass of the suite maps lines to tests (cached), then each mutant runs the tests of its line.
MUTATION_ARGS ?=
mutation: setup
	nice -n 19 $(PY) bench/mutation.py --python $(PY) $(MUTATION_ARGS)

clean:
	@$(VENV_CHECK)
	rm -rf $(VENV) .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

# Unquoted in the recipes below: a blank in either would split one path in two
# (`rm -rf /data x`, `venv --clear /data x/venv` empty /data and make ./x). The unit
# is edited by sed and read by systemd: an & (sed puts the old path there, the shell
# runs half a command in the background) or a % (a systemd specifier) would make it
# name another folder; such paths are refused before anything is made.
SAFE_PATHS = case "$(DESTDIR)$(PREFIX)" in *" "*|*"	"*) \
	echo "DESTDIR and PREFIX must not contain blanks" >&2; exit 2;; esac; \
	case "$(PREFIX)" in /?*) ;; *) echo "PREFIX must be an absolute path" >&2; exit 2;; esac; \
	case "$(DESTDIR)$(PREFIX)$(DATA_DIR)" in *[!A-Za-z0-9._/+@:=,~-]*) echo "DESTDIR, PREFIX and" \
		"DATA_DIR may hold only letters, digits and . _ / + @ : = , ~ -" >&2; exit 2;; esac; \
	case "$(DATA_DIR)" in ""|/?*) ;; *) echo "DATA_DIR must be an absolute path" >&2; exit 2;; esac

# In the two helpers below, a signal ends the shell through its EXIT trap, which removes
# what it wrote (a shell runs no EXIT trap when a signal kills it).
EXIT_ON_SIGNALS = trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM

# `$(call install_whole,FOLDER,FILES...)`: FILES (0644) into FOLDER as an upgrade must
# replace them: every one written beside its place first, so that a full disk or a
# Ctrl-C leaves the installed ones whole (install writes in place: a cut boot.py or
# module fails, or silently skips, every boot), flushed, then each renamed over its
# place. A file given as `SOURCE:NAME` is installed under NAME; a NAME with a folder
# (entomologist/errors.py) goes into that folder of FOLDER, which must exist. The
# scripts and their package go in one call: a disk that fills while the package is
# written must not leave the new scripts beside the old package. A third argument is a
# command run between the flush and the renames: if it fails, nothing is renamed.
define install_whole
	@set -e; new=; trap 'rm -f $$new' EXIT; $(EXIT_ON_SIGNALS); \
	beside() { case $$1 in */*) echo $(1)/$${1%/*}/.$${1##*/}.new;; *) echo $(1)/.$$1.new;; esac; }; \
	for f in $(2); do t=$$(beside $${f#*:}); new="$$new $$t"; install -m 0644 $${f%%:*} $$t; done; \
	sync $$new; \
	$(if $(3),$(3);) \
	for f in $(2); do name=$${f#*:}; mv -f $$(beside $$name) $(1)/$$name; done; \
	new=; echo "installed $(words $(2)) file(s) into $(1)"
endef

# `$(call install_edited,FOLDER,NAME,SED_SCRIPT,SOURCE)`: SOURCE edited by SED_SCRIPT,
# installed whole (0644) as FOLDER/NAME, the same way. Its temporary file is made new by
# mktemp (O_EXCL): a redirection into a fixed name would write through a link, or into
# a file, that another user who can write FOLDER left there.
define install_edited
	@set -e; t=; trap 'rm -f $$t' EXIT; $(EXIT_ON_SIGNALS); t=$$(mktemp --suffix=.new $(1)/.$(2).XXXXXX); \
	sed '$(3)' $(4) > $$t; chmod 0644 $$t; sync $$t; mv -f $$t $(1)/$(2); \
	echo "installed $(1)/$(2)"
endef

install:
	@$(SAFE_PATHS)
	install -d -m 0755 $(DESTDIR)$(PREFIX)
	@# An existing config folder keeps its owner and mode (0700 stays 0700).
	[ -d $(DESTDIR)/etc/entomologist ] || install -d -m 0755 $(DESTDIR)/etc/entomologist
	install -d -m 0755 $(DESTDIR)$(PREFIX)/entomologist
	@# New scripts are put in place only once the libraries they need are: an upgrade
	@# without network fails in install-libraries and leaves the old scripts.
	$(call install_whole,$(DESTDIR)$(PREFIX),$(APP_FILES) $(PACKAGE_FILES),$(INSTALL_LIBRARIES))
	# The unit's file system is read-only: without these the scripts would be
	# compiled again at every boot.
	$(DESTDIR)$(PREFIX)/venv/bin/python -m compileall -q --invalidation-mode checked-hash \
		$(if $(DESTDIR),-s $(DESTDIR) -p /) $(DESTDIR)$(PREFIX)/boot.py $(DESTDIR)$(PREFIX)/update_boot_status.py \
		$(DESTDIR)$(PREFIX)/entomologist
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	$(call install_edited,$(DESTDIR)$(UNITDIR),$(UNIT),s#/opt/entomologist#$(PREFIX)#g,systemd/$(UNIT))
ifneq ($(PKCS11),)
	install -d -m 0755 $(DESTDIR)$(UNITDIR)/$(UNIT).d
	$(call install_whole,$(DESTDIR)$(UNITDIR)/$(UNIT).d,systemd/pkcs11-$(PKCS11).conf:pkcs11.conf)
endif
ifneq ($(DATA_DIR),)
	install -d -m 0755 $(DESTDIR)$(UNITDIR)/$(UNIT).d
	$(call install_edited,$(DESTDIR)$(UNITDIR)/$(UNIT).d,data-dir.conf,s#/data/entomologist#$(DATA_DIR)#g,systemd/data-dir.conf)
endif
	@if [ -z "$(DESTDIR)" ] && [ -d "$(SYSTEMD_RUNDIR)" ]; then \
		echo "systemctl daemon-reload && systemctl enable $(UNIT)"; \
		systemctl daemon-reload && systemctl enable $(UNIT); \
	else \
		[ -n "$(DESTDIR)" ] || echo "systemd is not running (no $(SYSTEMD_RUNDIR)): enabling $(UNIT) by its symlink"; \
		install -d -m 0755 $(DESTDIR)$(UNITDIR)/multi-user.target.wants && \
		ln -sfn $(UNITDIR)/$(UNIT) $(DESTDIR)$(UNITDIR)/multi-user.target.wants/$(UNIT); \
	fi

# The venv of an installed tree and the libraries of requirements.txt in it (run by
# install between writing the new scripts beside their places and renaming them).
# Named through a variable: a recipe line that names $(MAKE) itself is run even by
# `make -n`, and that line writes and renames the installed files.
INSTALL_LIBRARIES = $(MAKE) --no-print-directory install-libraries
install-libraries:
	@$(SAFE_PATHS)
	@$(MAKE) --no-print-directory install-venv
	@out=$$($(DESTDIR)$(PREFIX)/venv/bin/python -m pip install -q --disable-pip-version-check \
		--dry-run --only-binary=:all: --no-deps -r requirements.txt 2>&1); \
	missing=$$(printf '%s\n' "$$out" | sed -n 's/.*satisfies the requirement \([^ ]*\).*/\1/p'); \
	if [ -n "$$missing" ] && ! printf '%s\n' "$$out" | grep -q -e Retrying -e 'Could not fetch'; then \
		echo "make install: no prebuilt wheel of $$missing (and perhaps others) for this" \
			"machine ($$(uname -m)); pip will compile it, which needs $(BUILD_DEPS):" \
			"installing them first." \
			"The build takes long on a board; see README, 32-bit boards." >&2; \
		{ $(SUDO) apt-get update -qq && $(APT_INSTALL) $(BUILD_DEPS); } || exit 1; \
	fi
	$(DESTDIR)$(PREFIX)/venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt

# The venv of an installed tree, on its own so that its rules can be tested alone.
install-venv:
	@$(SAFE_PATHS)
	@# Installing again (an upgrade) keeps a venv of the same Python: rebuilding it is
	@# most of the time such an install takes.
	@# Kept only if it is a venv (its pyvenv.cfg read: else its python is the base
	@# interpreter, and pip would install into the system) with pip (a first install
	@# cut short between bin/python and ensurepip has none). Otherwise made anew with
	@# --clear: venv over an old venv keeps its bin/python links to the old Python.
	@# Its bin/python is run (as root) only if it resolves to INSTALL_PYTHON's own
	@# file: never a link to a file someone else could have written. A venv folder
	@# that is a symlink is refused: --clear would empty the folder it points to.
	@if [ -L $(DESTDIR)$(PREFIX)/venv ]; then \
		echo "$(DESTDIR)$(PREFIX)/venv is a symlink: remove it, then install again" >&2; exit 1; fi
	@v=$(DESTDIR)$(PREFIX)/venv/bin/python; version='import sys; print(sys.version)'; \
	venv='import sys, importlib.metadata as m; assert sys.prefix != sys.base_prefix; \
		files = m.distribution("pip").files; \
		assert files and all(f.locate().exists() for f in files); print(sys.version)'; \
	if [ -x "$$v" ] && [ "$$(readlink -f "$$v")" = "$$(readlink -f "$$(command -v $(INSTALL_PYTHON))")" ] && \
		[ "$$("$$v" -c "$$venv" 2>/dev/null)" = "$$($(INSTALL_PYTHON) -c "$$version")" ]; then \
		echo "keeping $(DESTDIR)$(PREFIX)/venv (Python $$("$$v" -c 'import platform; print(platform.python_version())'))"; \
	else \
		echo "$(INSTALL_PYTHON) -m venv --clear $(DESTDIR)$(PREFIX)/venv"; \
		$(INSTALL_PYTHON) -m venv --clear $(DESTDIR)$(PREFIX)/venv; \
	fi

# As an image builder would: make install inside an emulated Debian arm64 root,
# then boot it against the stand-in (root; slow, so not part of `make test`).
image-tools:
	@command -v debootstrap >/dev/null && [ -e /usr/lib/binfmt.d/qemu-aarch64.conf ] || \
		{ $(SUDO) apt-get update -qq && $(APT_INSTALL) debootstrap qemu-user-static; }

image-test: setup image-tools
	$(SUDO) $(PY) image/imagetest.py $(IMAGE_TEST_ARGS)

# The installed unit under a real systemd: a Debian bookworm root booted by
# systemd-nspawn with systemd as PID 1, the scenarios of README, Tests (root;
# not part of `make test`). systemd-container is installed at the version of
# the host's systemd, so that no host package is upgraded for it.
system-tools:
	@command -v debootstrap >/dev/null || { $(SUDO) apt-get update -qq && $(APT_INSTALL) debootstrap; }
	@command -v systemd-nspawn >/dev/null || { \
		v=$$(dpkg-query -W -f='$${Version}' systemd 2>/dev/null); \
		$(SUDO) apt-get update -qq; \
		$(APT_INSTALL) systemd-container$${v:+=$$v} || $(APT_INSTALL) systemd-container; }

system-test: setup system-tools
	$(SUDO) $(PY) image/systemtest.py $(SYSTEM_TEST_ARGS)

# Never touches /etc/entomologist: the config and the device's credentials stay.
uninstall:
	@$(SAFE_PATHS)
	@# Quiet when there is nothing left to remove: a second uninstall prints no error.
	@if [ -z "$(DESTDIR)" ] && [ -d "$(SYSTEMD_RUNDIR)" ] && [ -e $(UNITDIR)/$(UNIT) ]; then \
		systemctl disable $(UNIT) || true; fi
	rm -f $(DESTDIR)$(UNITDIR)/multi-user.target.wants/$(UNIT) $(DESTDIR)$(UNITDIR)/$(UNIT)
	rm -f $(DESTDIR)$(UNITDIR)/$(UNIT).d/pkcs11.conf $(DESTDIR)$(UNITDIR)/$(UNIT).d/data-dir.conf
	[ ! -d $(DESTDIR)$(UNITDIR)/$(UNIT).d ] || rmdir --ignore-fail-on-non-empty $(DESTDIR)$(UNITDIR)/$(UNIT).d
	@# What install put in PREFIX, and no more: PREFIX may be a folder others share
	@# (/usr/local), whose other files are not ours to remove.
	rm -f $(foreach f,$(APP_FILES),$(DESTDIR)$(PREFIX)/$(f) $(DESTDIR)$(PREFIX)/.$(f).new)
	rm -f $(DESTDIR)$(PREFIX)/__pycache__/boot.*.pyc $(DESTDIR)$(PREFIX)/__pycache__/update_boot_status.*.pyc
	rm -rf $(DESTDIR)$(PREFIX)/entomologist $(DESTDIR)$(PREFIX)/venv
	[ ! -d $(DESTDIR)$(PREFIX)/__pycache__ ] || rmdir --ignore-fail-on-non-empty $(DESTDIR)$(PREFIX)/__pycache__
	[ ! -d $(DESTDIR)$(PREFIX) ] || rmdir --ignore-fail-on-non-empty $(DESTDIR)$(PREFIX)
	@if [ -z "$(DESTDIR)" ] && [ -d "$(SYSTEMD_RUNDIR)" ]; then systemctl daemon-reload || true; fi
