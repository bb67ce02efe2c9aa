#!/usr/bin/env bash
# The demo behind `make demo`: generate a labelled library, index it, query fresh clips,
# teach a new category from three examples. Uses ./index (the default index location).
set -euo pipefail
cd "$(dirname "$0")/.."
out=examples/generated
rm -rf "$out" index/simsearch.db* index/vectors.* index/lock
python examples/make_library.py "$out"

echo; echo '$ simsearch index examples/generated/library --label-from-folders'
simsearch index "$out/library" --label-from-folders
echo; echo '$ simsearch index examples/generated/long        # a 12 s field recording, unlabelled'
simsearch index "$out/long"

echo; echo '$ simsearch query examples/generated/queries/{bell,rain,whoosh}_query.wav -k 3'
simsearch query "$out"/queries/{bell,rain,whoosh}_query.wav -k 3

echo; echo '$ simsearch query examples/generated/queries/siren_query.wav -k 3      # a kind nobody taught yet'
simsearch query "$out/queries/siren_query.wav" -k 3

echo; echo '$ simsearch label siren examples/generated/siren/siren_{1,2,3}.wav      # teach it from three examples'
simsearch label siren "$out"/siren/siren_{1,2,3}.wav
echo; echo '$ simsearch query examples/generated/queries/siren_query.wav -k 3 --json'
simsearch query "$out/queries/siren_query.wav" -k 3 --json

echo; echo '$ simsearch query examples/generated/queries/hum_query.wav -k 2 --include "*/long/*"   # where in the long file?'
simsearch query "$out/queries/hum_query.wav" -k 2 --include '*/long/*'

echo; echo '$ simsearch labels'; simsearch labels
echo; echo '$ simsearch info'; simsearch info

echo; echo '$ simsearch evaluate examples/generated/library --label-from-folders --encoder cnn,features --shots 1,3 --folds 4'
mkdir -p "$out/plots"
simsearch evaluate "$out/library" --label-from-folders --encoder cnn,features --shots 1,3 --folds 4 --quiet \
    --plot "$out/plots/evaluate.png"

echo; echo 'Pictures that explain the answers:'
simsearch query "$out/queries/siren_query.wav" -k 5 --plot "$out/plots/query.png" --quiet > /dev/null
simsearch show "$out/queries/bell_query.wav" --plot "$out/plots/show.png"
ls "$out"/plots/*.png
