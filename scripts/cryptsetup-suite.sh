#!/bin/bash
# Keep score against cryptsetup's own test suite (issue 12): run upstream cryptsetup 2.6.1 test scripts
# with `cryptsetup` replaced by this checkout's cryptmap, and print how many of their cases pass.
#
#   scripts/cryptsetup-suite.sh CRYPTSETUP_SRC [SCRIPT...]      (default: compat-test compat-test2)
#
# CRYPTSETUP_SRC is a cryptsetup source tree (its tests/ directory; tag v2.6.1), or a bare git directory
# of it (then tests/ at v2.6.1 is extracted to a temp dir). The test scripts stay outside this repository.
# CST_MODES="real cm" runs /usr/sbin/cryptsetup too (the reference: it passes every case it can run here).
# Needs root (loop devices), bash, python3, gcc, keyutils and expect; runs one script at a time (they share
# loop devices and names); each takes minutes. Logs: $CST_LOGS (default /tmp/cst-logs).
#
# How a case is counted (scripts/cryptsetup-suite/analyze.py): a case is one assertion of a script, a
# main-level statement that calls `fail` (which the harness makes log and return, so every assertion
# counts). Cases that need kernel device-mapper (activate, status, close, /dev/mapper, dmsetup,
# dm-integrity) are left out for every binary; the printed score is over the rest. Of those, the cases
# that need a mapping only by name (cryptsetup open/create, status, resize, close, luksSuspend/Resume; no
# /dev/mapper node, dmsetup or dm-integrity) get a second score for cryptmap, whose daemon stands in for
# device-mapper (real cryptsetup cannot run them without device-mapper). The harness came from
# a session's measurement in ../shared/cryptsetup-suite (its results.md has the first score and causes).
set -eu
SRC=${1:?usage: scripts/cryptsetup-suite.sh CRYPTSETUP_SRC [SCRIPT...]}
shift
SCRIPTS=${*:-compat-test compat-test2}
H=$(cd "$(dirname "$0")/cryptsetup-suite" && pwd)
CM=$(cd "$(dirname "$0")/.." && pwd)
LOGS=${CST_LOGS:-/tmp/cst-logs}
TMP=${CST_TMP:-/tmp/cst}
mkdir -p "$TMP" "$LOGS"
TMP=$(cd "$TMP" && pwd) LOGS=$(cd "$LOGS" && pwd)
# The scripts' losetup (scripts/cryptsetup-suite/bin/losetup): loop devices from CST_LOOP_BASE (400) up,
# detached only when bound to a file under $TMP, so no other process's loop devices are touched.
REAL_LOSETUP=$(command -v losetup)

if [ -d "$SRC/tests" ]; then
	TREE=$SRC
else
	TREE=$TMP/cryptsetup-src
	if [ ! -d "$TREE/tests" ]; then
		mkdir -p "$TREE"
		# blob by blob: a mirror may lack large blobs that no CLI test needs
		git --git-dir="$SRC" ls-tree -r v2.6.1 -- tests | while read -r mode _ sha path; do
			mkdir -p "$TREE/$(dirname "$path")"
			git --git-dir="$SRC" cat-file blob "$sha" > "$TREE/$path" 2>/dev/null || rm -f "$TREE/$path"
			[ "$mode" != 100755 ] || chmod +x "$TREE/$path" 2>/dev/null || true
		done
	fi
fi
[ -x "$TMP/differ" ] || gcc -o "$TMP/differ" "$TREE/tests/differ.c"
[ -f "$CM/dist/src/cli/entry.js" ] || (cd "$CM" && npm run build --silent)
command -v keyctl >/dev/null && command -v expect >/dev/null || { echo "install keyutils and expect" >&2; exit 1; }

for m in real cm; do mkdir -p "$TMP/bin/$m"; done
sed -e "s|@REAL@|/usr/sbin/cryptsetup|" -e "s|@VERB_FIRST@|0|" "$H/wrapper.sh.in" > "$TMP/bin/real/cryptsetup"
sed -e "s|@REAL@|node $CM/bin/cryptmap.js|" -e "s|@VERB_FIRST@|0|" "$H/wrapper.sh.in" > "$TMP/bin/cm/cryptsetup"
chmod +x "$TMP"/bin/*/cryptsetup

# A cryptmap daemon of this checkout for the cases that open (through it) and close again.
RUN=$TMP/run
mkdir -p "$RUN"; chmod 700 "$RUN"
node "$CM/bin/cryptmap.js" daemon --runtime-dir "$RUN" > "$TMP/daemon.log" 2>&1 &
DAEMON=$!
trap 'kill $DAEMON 2>/dev/null; wait $DAEMON 2>/dev/null' EXIT
for _ in $(seq 50); do CRYPTMAP_RUNTIME_DIR=$RUN node "$CM/bin/cryptmap.js" dm ls >/dev/null 2>&1 && break; sleep 0.2; done

for s in $SCRIPTS; do
	for mode in ${CST_MODES:-cm}; do
		WORK=$TMP/work/$s.$mode RES=$LOGS/$s/$mode
		rm -rf "$WORK" "$RES"; mkdir -p "$WORK" "$RES"
		cp -a "$TREE/tests" "$WORK/tests"; cp "$TMP/differ" "$WORK/tests/differ"
		python3 "$H/instrument.py" "$TREE/tests/$s" > "$WORK/tests/$s.cst"
		: > "$RES/fails"; : > "$RES/exec.lines"
		start=$(date +%s)
		set +e
		(cd "$WORK/tests" && env CST_RES="$RES" CST_MODE="$mode" CST_HARNESS="$H" CST_CM="$CM/bin/cryptmap.js" \
			CRYPTMAP_RUNTIME_DIR="$RUN" CRYPTSETUP_PATH="$TMP/bin/$mode" CST_HAVE_KEYRING=1 srcdir=. \
			CST_TMP="$TMP" CST_REAL_LOSETUP="$REAL_LOSETUP" PATH="$H/bin:$PATH" \
			timeout "${CST_TIMEOUT:-5400}" bash "./$s.cst" > "$RES/stdout.log" 2>&1)
		echo "rc=$? seconds=$(( $(date +%s) - start ))" > "$RES/exit"
		set -e
		python3 "$H/pack-calls.py" "$RES"
		CST_MODE=cm CST_CM="$CM/bin/cryptmap.js" CRYPTMAP_RUNTIME_DIR=$RUN bash -c "source '$H/close-all.sh'; cst_close_all"
		"$REAL_LOSETUP" -a | grep "$WORK" | cut -d: -f1 | CST_TMP=$TMP CST_REAL_LOSETUP=$REAL_LOSETUP xargs -r -n1 "$H/bin/losetup" -d
	done
	CST_LOGS=$LOGS CST_SRC=$TREE python3 "$H/analyze.py" "$s" --summary | python3 -c '
import json, os, sys
r = json.load(sys.stdin)
if "images" in r:  # luks1-compat-test: one case per image (its passphrase check); the activation part needs dm
    print("%s: %d images, %d runnable without device-mapper (per cryptsetup\x27s run); passes: %s" % (r["script"], r["images"], r["nodm_images"],
          ", ".join("%s %d" % ("cryptsetup" if m == "real" else "cryptmap", r[m + "_ok"]) for m in ("real", "cm") if m + "_ok" in r)))
    sys.exit(0)
modes = [m for m in ("real", "cm") if os.path.isdir(os.path.join(sys.argv[1], r["script"], m))]
print("%s: %d cases, %d need device-mapper (left out), %d runnable; passes: %s" % (r["script"], r["cases"], r["dm"], r["nodm_run"],
      ", ".join("%s %d (not reached %d)" % ("cryptsetup" if m == "real" else "cryptmap", r[m + "_pass"], r[m + "_notrun"]) for m in modes)))
if "cm" in modes:
    print("%s: of the %d device-mapper cases, %d need a mapping only by name (open/status/resize/close; cryptmap\x27s daemon stands in): cryptmap passes %d" % (
        r["script"], r["dm"], r["dmname"], r["cm_dmname_pass"]))' "$LOGS"
done
