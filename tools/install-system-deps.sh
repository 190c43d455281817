#!/usr/bin/env bash
# Install the optional system packages the project uses, each only when the file it provides is
# missing. Idempotent and quiet; it never fails the command it is part of: without a package the
# features (and tests) that need it are skipped. Needs root and apt-get; otherwise it prints a note.
set -uo pipefail

# "debian-package:file that shows it is installed", one per line.
PACKAGES=(
  "fonts-noto-color-emoji:/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
  "chromium:/usr/bin/chromium"
  "gcc:/usr/bin/gcc"  # compiles the native float32 decoding kernel (dallemini/models/kernels)
)

missing=()
for entry in "${PACKAGES[@]}"; do
  pkg="${entry%%:*}"
  file="${entry#*:}"
  [[ -e "$file" ]] || missing+=("$pkg")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

note() { echo "install-system-deps: $*" >&2; }

if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  note "not installing ${missing[*]} (needs root and apt-get); tests that need them are skipped"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
apt_install() { apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$log" 2>&1; }
# Refresh the package lists only when installing from the current ones fails.
if apt_install || { apt-get update -qq >"$log" 2>&1 && apt_install; }; then
  note "installed ${missing[*]}"
else
  note "could not install ${missing[*]}: $(tail -n 1 "$log"); tests that need them are skipped"
fi
exit 0
