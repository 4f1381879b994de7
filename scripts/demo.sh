#!/usr/bin/env bash
# The README's main job (run scripts/bootstrap.sh first): with the bundle, train FBTA + ABMIL, its translated-head
# stage and the vanilla two-stage ABMIL baseline on the same slides, split, frozen features, head, optimiser, epochs
# and model selection, then print their held-out test metrics side by side. All are plain bundle runs:
#   python -m monai.bundle run training --config_file bundles/fbta_stad/configs/train.json [--views "['frozen']" ...]
#   python -m monai.bundle run training --config_file "['.../train.json','.../translated_head.json']"  (the 2nd stage)
# Rerun to resume; delete bundles/fbta_stad/{models,eval} to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$#" -gt 0 ]; then
    echo "scripts/demo.sh takes no arguments; run the bundle itself for other settings (see README.md)" >&2
    exit 2
fi
py=.venv/bin/python
root=bundles/fbta_stad
cfg=$root/configs/train.json
echo "== 1/4 FBTA + ABMIL (views frozen, e2e, translated) =="
# the frozen extractor: the bundle's self-supervised tiny CNN (SimCLR on other, unlabelled synthetic slides; see
# bundles/fbta_stad/docs/README.md): FBTA fine-tunes a pretrained extractor, and a random one does not learn end to end
# 20 epochs, half the bundle's 40, so both runs fit the README's ~6-minute budget on a 2-core CPU (the 5-fold study
# in docs/benchmarks.md trains the bundle's 40)
settings=(--encoder_name tiny_cnn --patch_size 64 --num_epochs 20)
"$py" -m monai.bundle run training --config_file "$cfg" "${settings[@]}" \
    --encoder_weights "$root/weights/tiny_cnn_simclr_synthetic.pt"
echo "== 2/4 FBTA's translated-head stage (f_T refitted to the trained extractor, then a head on f_T(F^FB) alone) =="
# reads models/last.pt of step 1; writes models/translated_head and eval/translated_head (docs/method.md)
"$py" -m monai.bundle run training --config_file "['$cfg','$root/configs/translated_head.json']" "${settings[@]}"
encoder=$(ls "$root"/models/frozen_encoder_*.pt | head -n 1)  # the same frozen extractor, so the same cached features
echo "== 3/4 vanilla ABMIL (views frozen only, same EMA teacher and model selection) =="
"$py" -m monai.bundle run training --config_file "$cfg" "${settings[@]}" --views "['frozen']" --encoder_weights "$encoder" \
    --ckpt_dir "$root/models/vanilla" --output_dir "$root/eval/vanilla"
echo "== 4/4 side by side =="
"$py" -m monai_fbta.pipeline.compare "ABMIL + FBTA (one head, as the paper)=$root/eval/test_metrics.json" \
    "ABMIL + FBTA + translated-head stage=$root/eval/translated_head/test_metrics.json" \
    "ABMIL (vanilla two-stage MIL)=$root/eval/vanilla/test_metrics.json"
