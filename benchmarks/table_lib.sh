# Shared by the accuracy-table scripts (peft_table.sh, senszoq_table.sh): one run per (task, row) at a forward-pass
# budget, dev-selected, seed 0, through `zotune train`. Source it after setting OUT and BUDGET.
#   ONLY=<prefix>   run only the rows whose name starts with it
#   SKIP="<task>-<row> ..."   skip these runs (their rows already in runs.jsonl stay: the summary merges)
#   CONFIG_ONLY=1   run nothing; write $RESULTS/configs/<task>-<row>.yaml for rows in runs.jsonl that lack one

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
  local args=(--config recipes/smollm2-sst2-mezo.yaml $(data_args "$task") --train.steps 100000
    --train.max_forwards "$BUDGET" --train.eval_every "$every" --train.early_stopping 0 --train.test true
    --train.test_at_start true --train.checkpoint_every "$every" --train.progress false --train.tensorboard false
    --out "$dir" "$@")
  if [ -n "${CONFIG_ONLY:-}" ]; then  # no run: the recipe this run keeps, for a row whose run folder is gone
    local dest="$RESULTS/configs/$task-$name.yaml"
    # a kept config stays; a run with no row yet gets none
    if [ ! -f "$dest" ] && grep -qs "\"run\": \"$task-$name\"" "$RESULTS/runs.jsonl"; then
      python -m zotune.bench.accuracy --config-only "$dest" "${args[@]}"
    fi
    return
  fi
  # an unfinished run with a checkpoint (a killed session) continues where it stopped: the same result (tested)
  if [ -f "$dir/config.yaml" ] && [ ! -f "$dir/results.json" ] && compgen -G "$dir/checkpoints/step-*" > /dev/null; then
    start=(--resume true)
  fi
  zotune train "${args[@]}" "${start[@]}"
}

summarize() {  # the finished runs' rows (and configs) into $RESULTS, keeping the rows of runs not here
  [ -n "${CONFIG_ONLY:-}" ] && return
  python -m zotune.bench.accuracy "$OUT"/* --out "$RESULTS" --merge
  echo "bash benchmarks/$(basename "$0")" > "$RESULTS/command.txt"  # for the results page (python -m zotune.bench.report)
}
