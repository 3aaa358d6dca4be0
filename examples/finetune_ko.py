"""Instruction-tune (SFT) a GPT-NeoX checkpoint with tensor, pipeline and data parallelism.

    torchrun --nproc_per_node 4 examples/finetune_ko.py          # the embedded CPU demo
    torchrun --nproc_per_node 8 examples/finetune_ko.py --model polyglot-ko-1.3b --bf16 \\
        --tensor-model-parallel-size 2 --finetune --load ckpt/polyglot-ko-1.3b \\
        --sft-data data/ko_sft --pack-sequences --tokenizer data/tokenizer.json --save ckpt/ko-sft

The trainer and the flags of examples/pretrain_ko.py (every flag is a field of megaglot.config's
dataclasses). --sft-data is the prefix tools/preprocess_sft.py wrote: the loss covers the response
tokens only (and their end-of-text token), averaged over the response tokens of the global batch;
--split holds documents out for the validation loss; --pack-sequences puts several samples in a
row with positions and attention reset at each. --finetune --load CKPT starts from CKPT's weights
at iteration 0; rerunning with --load of the --save directory (without --finetune) resumes.

With none of --sft-data, --data-path, --model and --load: the demo. It fine-tunes the pretraining
demo's checkpoint (checkpoints/demo; the pretraining demo runs first, in the same processes, if it
is absent) on the bundled examples/data/ko_instruct.jsonl, preprocessed with the demo's tokenizer,
at TP=2 x PP=2 on 4 processes, into a fresh checkpoints/sft-demo, then answers a held-out question
through the koalpaca template (greedy, up to the end-of-text token). Any flag given overrides its
preset (see sft_demo_preset). Exit codes as in examples/pretrain_ko.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pretrain_ko as base  # noqa: E402 - the shared start-up pieces; examples/ is not a package

ROOT = base.ROOT
DEMO_INSTRUCT = os.path.join(ROOT, "examples", "data", "ko_instruct.jsonl")
DEMO_SAVE = os.path.join(ROOT, "checkpoints", "sft-demo")
DEMO_TEMPLATE = "koalpaca"


def parse_args(argv=None):
    """pretrain_ko.py's flags (one per config field; absent ones stay absent)."""
    from megaglot.config.cli import add_config_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, shown_defaults={"model.name": "tiny"})
    return p.parse_args(argv)


def is_demo(flags: dict) -> bool:
    train, model = flags.get("train", {}), flags.get("model", {})
    data, ckpt = train.get("data", {}), train.get("checkpoint", {})
    return not ({"sft_data", "data_path"} & data.keys() or "name" in model or "load" in ckpt)


def sft_demo_preset(world: int, load: str):
    """(model preset, ParallelConfig, TrainConfig) of the SFT demo: the pretraining demo's model and
    layout, fine-tuned from `load` for 60 steps of 8 rows of 256 tokens, each packed with 2-3 instruction
    samples (the tiny tokenizer spends ~90 tokens on one), 10% of them held out."""
    from megaglot.config import (CheckpointConfig, DataConfig, LoggingConfig, OptimizerConfig, ParallelConfig,
                                 TrainConfig)

    tp, pp = base.default_layout(world)
    train = TrainConfig(seq_length=256, micro_batch_size=2, global_batch_size=8, train_iters=60, eval_interval=20,
                        eval_iters=1,
                        optimizer=OptimizerConfig(lr=5e-4, min_lr=5e-5, lr_warmup_iters=5),
                        data=DataConfig(split="90,10,0", pack_sequences=True),
                        checkpoint=CheckpointConfig(load=load, finetune=True, save=DEMO_SAVE),
                        logging=LoggingConfig(log_interval=10, tensorboard_dir=os.path.join(ROOT, "runs", "sft-demo")))
    return "tiny", ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), train


def build_configs(args, world: int, demo_checkpoint):
    """(model, parallel, train): the SFT demo's preset (when demo_checkpoint is set) or pretrain_ko's
    run preset, then every flag given on top; sdpa falls back to the torch path on CPU as there."""
    import dataclasses

    import torch

    from megaglot.config.cli import configs_from_args, given

    flags = given(args)
    preset = (sft_demo_preset(world, demo_checkpoint) if demo_checkpoint
              else base.run_preset(flags.get("model", {}).get("name", "tiny")))
    model, parallel, train = configs_from_args(args, *preset)
    if model.attention_backend == "sdpa" and "attention_backend" not in flags.get("model", {}) \
            and not torch.cuda.is_available():
        model = dataclasses.replace(model, attention_backend="torch")
    return model, parallel, train


def ensure_demo_checkpoint(world: int) -> str:
    """The pretraining demo's checkpoint root; runs that demo here first when it has no `latest`
    (rank 0 looks, so every rank takes the same branch)."""
    import torch.distributed as dist

    from megaglot.parallel import state
    from megaglot.training import pretrain
    from megaglot.training.metrics import log0

    root = base.demo_preset(world)[2].checkpoint.save
    found = [os.path.exists(os.path.join(root, "latest")) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(found, src=0)
    if not found[0]:
        log0(f"SFT demo: {root} holds no checkpoint yet; running the pretraining demo (examples/pretrain_ko.py) first")
        model, parallel, train, tokenizer = base.start(base.parse_args([]))
        pretrain(model, parallel, train, tokenizer=tokenizer)
        state.destroy()  # the fine-tuning run forms its groups afresh
    return root


def _preprocess_instruct(prefix: str, tokenizer: str):
    """(error or None): the bundled instruction sample -> `prefix` with the demo's tokenizer."""
    import io

    from megaglot.data.sft import SFTConfig, preprocess_sft

    try:
        preprocess_sft(SFTConfig(input=[DEMO_INSTRUCT], output_prefix=prefix, tokenizer=tokenizer,
                                 template=DEMO_TEMPLATE, lang="ko"), log=io.StringIO())
        return None
    except Exception as e:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
        return f"preparing the SFT demo data from {DEMO_INSTRUCT} into {prefix}: {type(e).__name__}: {e}"


def prepare_sft_demo_data(train, model) -> dict:
    """Preprocess ko_instruct.jsonl with the pretraining demo's tokenizer (rank 0 first, then the first
    rank of a node that does not see its files); sets --sft-data and --tokenizer; returns the first
    first held-out record without PII (the question the demo answers at the end: training saw PII
    masked, a question typed in would not be)."""
    import copy

    import torch.distributed as dist

    from megaglot.config import ConfigError
    from megaglot.data.gpt_dataset import split_document_ranges
    from megaglot.data.pii import find_pii
    from megaglot.data.sft_dataset import sft_prefixes

    pretraining = copy.deepcopy(train)
    base.prepare_demo_data(pretraining, model)  # the demo corpus and its tokenizer, as the checkpoint saw them
    tokenizer = pretraining.data.tokenizer
    prefix = os.path.join(os.path.dirname(tokenizer), "ko_instruct")
    error = _preprocess_instruct(prefix, tokenizer) if dist.get_rank() == 0 else None
    box = [error]
    dist.broadcast_object_list(box, src=0)
    error = box[0]
    if error is None and int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0 and dist.get_rank() != 0 \
            and not os.path.exists(sft_prefixes(prefix)[1] + ".idx"):
        error = _preprocess_instruct(prefix, tokenizer)  # a node-local cache (preprocessing is deterministic)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if any(errors):
        raise ConfigError(next(e for e in errors if e))
    train.data.sft_data, train.data.tokenizer = prefix, tokenizer
    with open(DEMO_INSTRUCT, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    begin, end = split_document_ranges(train.data.split, len(records))[1]
    held_out = [r for r in records[begin:end] if not find_pii(r["instruction"] + r["output"])]  # as typed, unmasked
    if not held_out:
        raise ConfigError(f"--split {train.data.split} holds out no question of {DEMO_INSTRUCT} for the demo's answer")
    return held_out[0]


def fresh_save_dir(root: str) -> None:
    """Each demo run fine-tunes from the pretraining checkpoint into an empty checkpoints/sft-demo."""
    import shutil

    import torch.distributed as dist

    from megaglot.training.metrics import log0

    if dist.get_rank() == 0 and os.path.exists(root):
        shutil.rmtree(root)
        log0(f"SFT demo: removed the previous {root}; every demo run fine-tunes afresh from the pretraining demo")
    dist.barrier()


def start(args):
    """(model, parallel, train, tokenizer, datasets, held-out record or None) with the process group up
    and the banner printed; the SFT datasets are built (and checked) before the model."""
    from megaglot.config import ConfigError, TrainConfig
    from megaglot.config.cli import given
    from megaglot.data.tokenizer import load_tokenizer
    from megaglot.training import init_distributed
    from megaglot.training.metrics import log0
    from megaglot.training.sft import build_sft_training_datasets

    flags = given(args)
    init_distributed(flags.get("train", {}).get("distributed_timeout_minutes", TrainConfig().distributed_timeout_minutes))
    import torch.distributed as dist

    world, demo = dist.get_world_size(), is_demo(flags)
    model, parallel, train = build_configs(args, world, ensure_demo_checkpoint(world) if demo else None)
    parallel.validate(model, world)
    record = prepare_sft_demo_data(train, model) if demo else None
    if demo and train.checkpoint.save == DEMO_SAVE:
        fresh_save_dir(DEMO_SAVE)
    tokenizer = None
    if train.data.tokenizer:
        tokenizer = load_tokenizer(train.data.tokenizer)
        model = base.fit_vocab_to_tokenizer(model, tokenizer, train.data.tokenizer, "vocab_size" in flags.get("model", {}))
        parallel.validate(model, world)
    train.validate(parallel.data_parallel_size_for(world))  # e.g. --pack-sequences without --sft-data
    if not train.data.sft_data and not train.data.data_path:
        raise ConfigError("--sft-data PREFIX is required (tools/preprocess_sft.py's output; or --data-path "
                          "to fine-tune on plain text)")
    datasets = build_sft_training_datasets(train, model, tokenizer, log=log0) if train.data.sft_data else None
    log0(f"megaglot fine-tuning: {model.name} ({model.num_parameters():,} parameters), "
         f"TP={parallel.tensor_model_parallel_size} PP={parallel.pipeline_model_parallel_size} "
         f"DP={parallel.data_parallel_size_for(world)}, {train.precision}, {train.train_iters} iterations of "
         f"{train.global_batch_size} x {train.seq_length} tokens, from {train.checkpoint.load or 'scratch'}"
         f"{' (--finetune)' if train.checkpoint.finetune else ''}")
    return model, parallel, train, tokenizer, datasets, record


def answer(run, tokenizer, record: dict, max_new_tokens: int = 48) -> str:
    """Greedy answer to a held-out record through the demo's template, up to the end-of-text token
    (collective: every rank runs the pipeline); rank 0 prints the question, the answer and the reference."""
    from megaglot.data.sft_templates import load_template
    from megaglot.data.text import decode_new_tokens
    from megaglot.eval.generation import generate
    from megaglot.training.metrics import log0

    prompt = load_template(DEMO_TEMPLATE).render_prompt(record["instruction"], record.get("input", ""))
    (new,) = generate(run.chunks, run.model_cfg, [tokenizer.encode(prompt)], max_new_tokens, eod=tokenizer.eod,
                      use_cache=False, device=run.device)
    stopped = bool(new) and new[-1] == tokenizer.eod
    text = decode_new_tokens(tokenizer, new[:-1] if stopped else new).strip()
    log0(f"held-out question: {record['instruction']}\nanswer ({DEMO_TEMPLATE} template, greedy, "
         f"{'stopped at <|endoftext|>' if stopped else f'{max_new_tokens} tokens'}): {text}\n"
         f"reference answer: {record['output']}")
    return text


def summary(result: dict) -> str:
    losses, valid = result["losses"], result["valid_losses"]
    line = f"SFT demo: training loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    if len(valid) >= 2:
        line += f"; held-out validation loss {valid[0]:.4f} -> {valid[-1]:.4f}"
    return line


def main(argv=None) -> int:
    args = parse_args(argv)
    import traceback

    from megaglot.config import ConfigError
    from megaglot.parallel.launch import record_error
    from megaglot.training import pretrain, shutdown
    from megaglot.training.metrics import log0
    from megaglot.training.signals import watch_sigint

    sigint, result, train = watch_sigint(), None, None
    try:
        model, parallel, train, tokenizer, datasets, record = start(args)
        result = pretrain(model, parallel, train, datasets=datasets, tokenizer=tokenizer)
        if record is not None and result["stopped_by_signal"] is None:
            answer(result["run"], tokenizer, record)
            log0(summary(result))
    except KeyboardInterrupt as e:
        base.exit_interrupted(e)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        if sigint.seen:  # a peer's Ctrl-C exit broke this rank's collective
            base.exit_interrupted(KeyboardInterrupt())
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        record_error(f"error: {e}")
        return base.EXIT_ERROR
    except Exception as e:
        if sigint.seen:
            base.exit_interrupted(KeyboardInterrupt())
        record_error(f"{type(e).__name__}: {e}", traceback.format_exc())
        raise
    finally:
        shutdown()
    return base.EXIT_TERMINATED_UNSAVED if result["stopped_by_signal"] and not train.checkpoint.save else 0


if __name__ == "__main__":
    sys.exit(main())
