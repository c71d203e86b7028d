# Shared by the accuracy-table scripts (peft_table.sh, senszoq_table.sh): one run per (task, row) at a forward-pass
# budget, dev-selected, seed 0, through `zotune train`. Source it after setting OUT and BUDGET.
#   ONLY=<prefix>   run only the rows whose name starts with it
#   SKIP="<task>-<row> ..."   skip these runs (their rows already in runs.jsonl stay: the summary merges)

data_args() {  # MeZO protocol where the data allows it (SuperGLUE here has 32 training rows: FewGLUE)
  case $1 in
    sst2) echo "--data.task sst2 --data.n_train 500 --data.n_dev 200 --data.n_test 872" ;;
    rte)  echo "--data.task rte --data.n_train 500 --data.n_dev 200 --data.n_test 277 --data.max_length 256" ;;
    sst5|trec) echo "--data.task $1 --data.protocol kshot --data.k 16 --data.n_test 500" ;;  # LM-BFF k-shot
    *)    echo "--data.task $1 --data.n_train 32 --data.n_test 500 --data.max_length 256" ;;
  esac
}

run() {  # run TASK NAME EVAL_EVERY [zotune train flags...]
  local task=$1 name=$2 every=$3; shift 3
  [ -n "${ONLY:-}" ] && [[ $name != $ONLY* ]] && return
  [[ " ${SKIP:-} " == *" $task-$name "* ]] && return
  local dir="$OUT/$task-$name" start=(--overwrite true)
  # an unfinished run with a checkpoint (a killed session) continues where it stopped: the same result (tested)
  if [ -f "$dir/config.yaml" ] && [ ! -f "$dir/results.json" ] && compgen -G "$dir/checkpoints/step-*" > /dev/null; then
    start=(--resume true)
  fi
  zotune train --config recipes/smollm2-sst2-mezo.yaml $(data_args "$task") --train.steps 100000 \
    --train.max_forwards "$BUDGET" --train.eval_every "$every" --train.early_stopping 0 --train.test true \
    --train.test_at_start true --train.checkpoint_every "$every" --train.progress false --train.tensorboard false \
    "${start[@]}" --out "$dir" "$@"
}
