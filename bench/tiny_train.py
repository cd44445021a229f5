"""A real transformers Trainer run that saves a checkpoint every few seconds, for bench/trainer.py.

A tiny GPT-2 made from a config (nothing downloaded) with a LoRA adapter (or, with --full,
every weight trained), on synthetic tokens, on the CPU, with save_total_limit=3. Each step is
padded to --save-seconds / --save-steps, so saves come at a steady pace. After each save
(after the Trainer's own rotation), one JSON line goes to --log: the checkpoint, the time the
save finished and every file's size and sha256, read before a later rotation can delete it.

Runs with the benchmark's venv (torch, transformers, peft). Before training it writes
{"event": "ready"} and waits for the file --go to exist, so that the backup side can start first.

    python bench/tiny_train.py OUT --log saves.jsonl --go go --checkpoints 30 --save-seconds 4
"""

import argparse
import json
import os
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from tree_hash import sha256_tree   # bench/, this script's directory

VOCAB = 1000
SEQ = 32
BATCH = 4


class Tokens(torch.utils.data.Dataset):
    """Random token ids, the same for the same index."""

    def __len__(self):
        return 100_000

    def __getitem__(self, i):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


class Record(TrainerCallback):
    """Paces the steps, and logs each save as it finishes."""

    def __init__(self, log_path, step_seconds):
        self.log = open(log_path, "a", buffering=1)
        self.step_seconds = step_seconds
        self.next = 0.0

    def write(self, **data):
        self.log.write(json.dumps(data, sort_keys=True) + "\n")

    def on_train_begin(self, args, state, control, **kw):
        self.next = time.monotonic()

    def on_step_end(self, args, state, control, **kw):
        self.next = max(self.next + self.step_seconds, time.monotonic())  # late: no catching up
        time.sleep(max(0.0, self.next - time.monotonic()))

    def on_save(self, args, state, control, **kw):
        saved_at = time.time()
        name = f"checkpoint-{state.global_step}"
        path = os.path.join(args.output_dir, name)
        files = sha256_tree(path)
        state_file = os.path.join(path, "trainer_state.json")
        self.write(event="saved", checkpoint=name, step=state.global_step, saved_at=saved_at,
                   state_mtime=os.stat(state_file).st_mtime if os.path.exists(state_file) else None,
                   hashed_seconds=round(time.time() - saved_at, 3), files=files,
                   size=sum(size for size, _h in files.values()))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", help="the run's output directory (remote_dir of the backup)")
    p.add_argument("--log", required=True, help="where each save is logged (JSON lines)")
    p.add_argument("--go", required=True, help="training starts once this file exists")
    p.add_argument("--checkpoints", type=int, default=30)
    p.add_argument("--save-steps", type=int, default=10)
    p.add_argument("--save-seconds", type=float, default=4.0, help="time between saves (steps are padded to it)")
    p.add_argument("--width", type=int, default=256, help="n_embd")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=128, help="LoRA rank: the checkpoint's size grows with it")
    p.add_argument("--full", action="store_true", help="train every weight, no LoRA (a larger checkpoint)")
    p.add_argument("--limit", type=int, default=3, help="save_total_limit")
    a = p.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=a.width, n_layer=a.layers,
                                       n_head=4))
    if not a.full:
        model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, task_type="CAUSAL_LM",
                                                 target_modules=["c_attn", "c_proj", "c_fc"]))
    args = TrainingArguments(output_dir=a.out, max_steps=a.checkpoints * a.save_steps, save_strategy="steps",
                             save_steps=a.save_steps, save_total_limit=a.limit, logging_steps=a.save_steps,
                             per_device_train_batch_size=BATCH, learning_rate=1e-3, report_to=[], use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True)
    record = Record(a.log, a.save_seconds / a.save_steps)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[record])
    record.write(event="ready", pid=os.getpid(), time=time.time())
    while not os.path.exists(a.go):
        time.sleep(0.05)
    record.write(event="started", time=time.time())
    trainer.train()
    record.write(event="done", time=time.time())


if __name__ == "__main__":
    main()
