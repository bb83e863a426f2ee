#!/usr/bin/env python3
"""The rpi4 root's kernel modules: what a Pi 4 node needs is there; what the
variant leaves out (kernel.omit_modules) is not, nor a module that needs it,
and modules.dep names no left-out module.

    python3 tests/image/check_rpi4_modules.py BUILD_DIR   (e.g. build/rpi4)

Reads update/root.erofs.zst with zstd and fsck.erofs --extract (erofs-utils);
prints what it found and exits non-zero on the first surprise."""

import json
import os
import subprocess
import sys
import tempfile

# Needed on a Pi 4 (as modules; the PCIe host, pin and clock drivers are built
# in): its Ethernet, SD card, USB (VL805 on PCIe) and its reset, watchdog,
# random number generator, temperature, CPU frequency, the PoE HAT's fan, I2C.
NEEDED = [
    "kernel/drivers/net/ethernet/broadcom/genet/genet.ko",
    "kernel/drivers/mmc/host/sdhci-iproc.ko",
    "kernel/drivers/usb/host/xhci-pci.ko",
    "kernel/drivers/reset/reset-raspberrypi.ko",
    "kernel/drivers/watchdog/bcm2835_wdt.ko",
    "kernel/drivers/char/hw_random/iproc-rng200.ko",
    "kernel/drivers/thermal/broadcom/bcm2711_thermal.ko",
    "kernel/drivers/cpufreq/raspberrypi-cpufreq.ko",
    "kernel/drivers/pwm/pwm-raspberrypi-poe.ko",
    "kernel/drivers/i2c/busses/i2c-bcm2835.ko",
]
# Left out (variants/rpi4/variant.toml), and one that needs a left-out module.
LEFT_OUT = [
    "kernel/sound",
    "kernel/drivers/gpu",
    "kernel/drivers/media",
    "kernel/drivers/net/wireless",
    "kernel/drivers/staging/vc04_services/bcm2835-audio/snd-bcm2835.ko",
]


def main() -> int:
    build = sys.argv[1]
    manifest = json.load(open(os.path.join(build, "manifest.json")))
    modules = f"/usr/lib/modules/{manifest['kernel_version']}"
    with tempfile.TemporaryDirectory() as scratch:
        image = os.path.join(scratch, "root.erofs")
        subprocess.run(["zstd", "-q", "-d", "-o", image, os.path.join(build, "update", "root.erofs.zst")], check=True)
        extracted = subprocess.run(["fsck.erofs", f"--extract={scratch}/x", image], capture_output=True, text=True)
        if extracted.returncode != 0:
            print(f"FAIL: fsck.erofs --extract: {extracted.stderr.strip()[-400:]}")
            return 1
        root = f"{scratch}/x{modules}"
        for path, wanted, why in [(path, True, "is missing (a Pi 4 needs it)") for path in NEEDED] + \
                [(path, False, "is in the root; kernel.omit_modules leaves it out") for path in LEFT_OUT]:
            if os.path.lexists(os.path.join(root, path)) != wanted:
                print(f"FAIL: {modules}/{path} {why}")
                return 1
        text = open(os.path.join(root, "modules.dep")).read()
        directories = tuple(path + "/" for path in LEFT_OUT if not path.endswith(".ko"))
        stale = [line.split(":")[0] for line in text.splitlines()
                 if any(part.startswith(directories) for part in line.replace(":", " ").split())]
        if stale:
            print(f"FAIL: modules.dep still names left-out modules: {stale[:5]}")
            return 1
        print(f"{len(NEEDED)} needed modules present; {len(LEFT_OUT)} left-out paths absent; "
              f"modules.dep ({len(text.splitlines())} modules) names none of them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
