# Racklet OS A/B boot script for U-Boot (compiled to boot.scr with mkimage).
#
# State (see os-format/src/boot_state.rs): two copies of a U-Boot binary
# environment with a CRC32, racklet/state-1.env and racklet/state-2.env on this
# ESP, each holding racklet_seq, racklet_order, racklet_committed,
# racklet_tries_a and racklet_tries_b ("-" = committed, N = tries left), and
# racklet_boots_a and racklet_boots_b: boots of a committed slot since the
# update agent last confirmed one healthy. A committed slot that has used
# @COMMITTED_BOOT_TRIES@ (os_format::layout::COMMITTED_BOOT_TRIES, filled in by the
# image builder) is skipped: a corrupted root that
# resets the machine gives way to the other slot's good version. When no slot
# can be started the script stops with a message (no reset loop, and never on
# to the network boot).
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
  env import -c ${racklet_buffer} 0x1000 racklet_seq racklet_order racklet_committed racklet_tries_a racklet_tries_b racklet_boots_a racklet_boots_b
  # State files written before committed slots were counted have no boots.
  if test -z "${racklet_boots_a}"; then setenv racklet_boots_a 0; fi
  if test -z "${racklet_boots_b}"; then setenv racklet_boots_b 0; fi
  echo "racklet: state copy ${racklet_newest} (sequence ${racklet_seq}): order ${racklet_order}, committed ${racklet_committed}, tries a=${racklet_tries_a} b=${racklet_tries_b}, boots a=${racklet_boots_a} b=${racklet_boots_b}"
else
  echo "racklet: no valid boot state; booting the committed slot ${racklet_committed}"
fi

# The order, then the committed slot (in case the order holds only spent tries).
for racklet_slot in ${racklet_order} ${racklet_committed}; do
  if test "${racklet_slot}" = "a"; then
    setenv racklet_tries ${racklet_tries_a}
    setenv racklet_boots ${racklet_boots_a}
  else
    setenv racklet_tries ${racklet_tries_b}
    setenv racklet_boots ${racklet_boots_b}
  fi
  setenv racklet_go 0
  if test "${racklet_newest}" = "0"; then
    # No valid state: nothing can be counted; the committed slot boots.
    setenv racklet_go 1
  elif test "${racklet_tries}" = "-"; then
    if itest ${racklet_boots} -lt @COMMITTED_BOOT_TRIES@; then
      setexpr racklet_boots ${racklet_boots} + 1
      if test "${racklet_slot}" = "a"; then setenv racklet_boots_a ${racklet_boots}; else setenv racklet_boots_b ${racklet_boots}; fi
      setexpr racklet_seq ${racklet_seq} + 1
      env export -c -s 0x1000 ${racklet_buffer} racklet_seq racklet_order racklet_committed racklet_tries_a racklet_tries_b racklet_boots_a racklet_boots_b
      if fatwrite ${racklet_part} ${racklet_buffer} racklet/state-${racklet_older}.env 0x1000; then
        echo "racklet: booting committed slot ${racklet_slot} (boot ${racklet_boots} of @COMMITTED_BOOT_TRIES@ before the agent confirms it)"
      else
        echo "racklet: cannot record the boot of committed slot ${racklet_slot}; booting it uncounted"
      fi
      setenv racklet_go 1
    else
      echo "racklet: committed slot ${racklet_slot} failed to start @COMMITTED_BOOT_TRIES@ times in a row; skipping it"
    fi
  elif itest ${racklet_tries} -gt 0; then
    setexpr racklet_tries ${racklet_tries} - 1
    if test "${racklet_slot}" = "a"; then setenv racklet_tries_a ${racklet_tries}; else setenv racklet_tries_b ${racklet_tries}; fi
    setexpr racklet_seq ${racklet_seq} + 1
    env export -c -s 0x1000 ${racklet_buffer} racklet_seq racklet_order racklet_committed racklet_tries_a racklet_tries_b racklet_boots_a racklet_boots_b
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

# Nothing could be started. Stop here: a reset would only repeat this, and
# U-Boot's next boot targets would go on to the network.
echo "racklet: STOPPED: no slot can be started (tries a=${racklet_tries_a} b=${racklet_tries_b}, boots a=${racklet_boots_a} b=${racklet_boots_b}; a committed slot gets @COMMITTED_BOOT_TRIES@ boots)."
echo "racklet: both slots failed. Write a fresh image to the card (or power-cycle to try again: remove racklet/state-1.env and racklet/state-2.env on the boot partition to boot the committed slot once more)."
while itest 1 -eq 1; do
  sleep 3600
done
