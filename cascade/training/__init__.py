"""The training engine: trains any registered stage with DeepSpeed (ZeRO 0-3) on CPU or GPU.

    deepspeed [--num_gpus N] train_stage.py --stage NAME --config configs/tiny/NAME.yaml \
        --data DIR --run-dir RUN [--deepspeed_config configs/deepspeed/zero2.json] [--export BUNDLE]

Modules: `config` (the stage YAML: stage / model / train), `distributed` (process group set-up,
also for a plain one-process `python` run), `lr_schedule` (warmup + cosine), `ema` (weight EMA that
gathers ZeRO-3 partitions), `zero_params` (gathering, 0-d parameters, parameters read outside their
module), `checkpoints` (atomic, resumable, across process counts), `run_dir` (which stage and config
a run directory belongs to), `run_log` (progress bar, metrics.jsonl, TensorBoard) and
`engine` (the loop that ties them together). The bundle format the export
writes lives in `cascade.bundle`; both write through `cascade.atomic_files` (temp-then-rename).
"""
