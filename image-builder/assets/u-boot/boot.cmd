# Racklet OS A/B boot script for U-Boot (compiled to boot.scr with mkimage).
#
# State (see os-format/src/boot_state.rs): two copies of a U-Boot binary
# environment with a CRC32, racklet/state-1.env and racklet/state-2.env on this
# ESP, each holding racklet_seq, racklet_order, racklet_committed,
# racklet_tries_a and racklet_tries_b ("-" = committed, N = tries left).
# The valid copy with the higher sequence wins; a write replaces the other copy,
# so a power cut during U-Boot's own write leaves the previous state readable.
# Numbers (racklet_seq, tries) are hexadecimal without a prefix, the format
# setexpr writes; they are compared with itest, which reads hexadecimal.
# The committed slot is also kept as a marker file racklet/committed-<slot>
# (renamed into place from Linux), used when neither copy can be read.

setenv racklet_part "${devtype} ${devnum}:${distro_bootpart}"
setexpr racklet_buffer ${ramdisk_addr_r} + 0x800000
setexpr racklet_load ${ramdisk_addr_r} + 0x1000000

setenv racklet_committed a
if test -e ${racklet_part} racklet/committed-b; then setenv racklet_committed b; fi
setenv racklet_fallback ${racklet_committed}

setenv racklet_seq1 0
setenv racklet_seq2 0
for racklet_copy in 1 2; do
  setenv racklet_seq
  if load ${racklet_part} ${racklet_buffer} racklet/state-${racklet_copy}.env; then
    if env import -c ${racklet_buffer} 0x1000 racklet_seq; then
      setenv racklet_seq${racklet_copy} ${racklet_seq}
    fi
  fi
done

setenv racklet_order ${racklet_committed}
setenv racklet_tries_a -
setenv racklet_tries_b -
setenv racklet_newest 0
if itest ${racklet_seq1} -gt 0 || itest ${racklet_seq2} -gt 0; then
  if itest ${racklet_seq2} -gt ${racklet_seq1}; then
    setenv racklet_newest 2
    setenv racklet_older 1
  else
    setenv racklet_newest 1
    setenv racklet_older 2
  fi
  load ${racklet_part} ${racklet_buffer} racklet/state-${racklet_newest}.env
  env import -c ${racklet_buffer} 0x1000 racklet_seq racklet_order racklet_committed racklet_tries_a racklet_tries_b
  echo "racklet: state copy ${racklet_newest} (sequence ${racklet_seq}): order ${racklet_order}, committed ${racklet_committed}, tries a=${racklet_tries_a} b=${racklet_tries_b}"
else
  echo "racklet: no valid boot state; booting the committed slot ${racklet_committed}"
fi

for racklet_slot in ${racklet_order}; do
  if test "${racklet_slot}" = "a"; then setenv racklet_tries ${racklet_tries_a}; else setenv racklet_tries ${racklet_tries_b}; fi
  setenv racklet_go 0
  if test "${racklet_tries}" = "-"; then
    setenv racklet_go 1
  elif itest ${racklet_tries} -gt 0; then
    setexpr racklet_tries ${racklet_tries} - 1
    if test "${racklet_slot}" = "a"; then setenv racklet_tries_a ${racklet_tries}; else setenv racklet_tries_b ${racklet_tries}; fi
    setexpr racklet_seq ${racklet_seq} + 1
    env export -c -s 0x1000 ${racklet_buffer} racklet_seq racklet_order racklet_committed racklet_tries_a racklet_tries_b
    if fatwrite ${racklet_part} ${racklet_buffer} racklet/state-${racklet_older}.env 0x1000; then
      echo "racklet: trying slot ${racklet_slot} (${racklet_tries} tries left after this one)"
      setenv racklet_go 1
    else
      echo "racklet: cannot record the try of slot ${racklet_slot}; not trying it"
    fi
  else
    echo "racklet: slot ${racklet_slot} has no tries left; skipping it"
  fi
  if test "${racklet_go}" = "1"; then
    # The UKI's own command line (slot, root hash) must be the only one.
    setenv bootargs
    if load ${racklet_part} ${racklet_load} EFI/Linux/racklet-${racklet_slot}.efi; then
      bootefi ${racklet_load} ${fdtcontroladdr}
    fi
    echo "racklet: slot ${racklet_slot} did not start"
  fi
done

echo "racklet: falling back to the committed slot ${racklet_fallback}"
setenv bootargs
if load ${racklet_part} ${racklet_load} EFI/Linux/racklet-${racklet_fallback}.efi; then
  bootefi ${racklet_load} ${fdtcontroladdr}
fi
echo "racklet: nothing bootable; resetting"
reset
