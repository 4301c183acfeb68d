"""Many small offline WandB runs, fast, in wandb's own file format (for bench/refresh.py).

Writing 1,000 runs with `wandb.init` / `finish` takes ~1 s each. Instead one *template* run
is written by the real wandb library (offline), its records are parsed with wandb's own
protobuf classes (`wandb.proto.wandb_internal_pb2.Record`), and every bench run is that
template with its run id, name, `_info.stream_id`, config seed and logged values rewritten,
then framed again as wandb frames `.wandb` files (wandb 0.31 has no Python writer: the
framing lives in wandb-core; the layout is the one `rts_dagster.sources.wandb_file`
documents and reads). Record order, numbering, timestamps, summaries and the exit record
stay exactly as wandb wrote them.

Runs are named `bench.task<k>.seed<s>` (three seeds per task), so the default discovery rule
maps them to task `task<k>`, seed `s`.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.signal import lfilter

from rts_dagster.offline_wandb import offline_settings, offline_wandb_env
from rts_dagster.sources.wandb_file import (
    BLOCK_LEN,
    CHUNK_HEADER_LEN,
    FILE_HEADER_LEN,
    FIRST,
    FULL,
    IDENT,
    LAST,
    MAGIC,
    MIDDLE,
    VERSION,
    iter_records,
    wait_for_exit_record,
)

LABEL_PREFIX = "env_per_label_rewards/"
KEY_SPS = "overview/sps"
KEY_AGENT_STEP = "metric/agent_step"
SEEDS_PER_TASK = 3
STEPS_PER_EPOCH = 65_536
USER = "bench"
# Metta-shaped label names (site.mission), cycled and numbered past the list's end.
_LABEL_STEMS = (
    "training_facility.extractor_hub_30",
    "training_facility.extractor_hub_50",
    "training_facility.collect_resources_classic",
    "hello_world.oxygen_bottleneck",
    "hello_world.energy_starved",
    "machina_1.divide_and_conquer",
)


def label_names(n_labels: int) -> list[str]:
    """`n_labels` distinct label names."""
    stems = _LABEL_STEMS
    return [
        stems[j % len(stems)] + ("" if j < len(stems) else f"_{j // len(stems)}")
        for j in range(n_labels)
    ]


def run_name(index: int) -> tuple[str, int, int]:
    """(run name, task number, seed) of the bench run number `index` (0-based)."""
    task, seed = divmod(index, SEEDS_PER_TASK)
    return f"{USER}.task{task}.seed{seed + 1}", task, seed + 1


def run_values(task: int, seed: int, n_epochs: int, n_labels: int) -> np.ndarray:
    """(n_epochs, n_labels + 1) values: label epoch means, then `overview/sps`.

    Each label follows a logistic learning curve shared by the task's seeds, plus
    seed-specific AR(1) noise (epoch means are serially correlated), white noise (so a
    local-level fit finds observation noise) and a few exact repeats of the previous
    epoch (no environment completed the label that epoch)."""
    task_rng = np.random.default_rng([task, 0])
    rng = np.random.default_rng([task, seed])
    t = np.arange(n_epochs)[:, None]
    ceiling = task_rng.uniform(0.3, 1.0, n_labels)
    midpoint = task_rng.uniform(0.2, 0.8, n_labels) * n_epochs
    width = task_rng.uniform(0.05, 0.2, n_labels) * n_epochs
    curve = ceiling / (1.0 + np.exp(-(t - midpoint) / width))
    held = lfilter([1.0], [1.0, -0.7], rng.normal(0.0, 0.015, (n_epochs, n_labels)), axis=0)
    means = curve + held + rng.normal(0.0, 0.02, (n_epochs, n_labels))
    repeat = rng.random((n_epochs, n_labels)) < 0.03
    repeat[0] = False
    rows = np.arange(n_epochs)[:, None] - repeat  # a repeat takes the previous epoch's row
    means = np.take_along_axis(means, np.maximum.accumulate(rows, axis=0), axis=0)
    sps = rng.normal(20_000.0, 1_500.0, (n_epochs, 1)).clip(1_000.0)
    return np.hstack([means, sps])


def frame_records(payloads: list[bytes]) -> bytes:
    """A `.wandb` file's bytes: the 7-byte header, then each serialized record in LevelDB-log
    chunks of 32 KiB blocks (CRC-32 of type byte + payload; a block tail shorter than a
    chunk header is zero padding), as wandb-core writes them."""
    out = bytearray(MAGIC + struct.pack("<HB", IDENT, VERSION))
    for payload in payloads:
        pos, first = 0, True
        while True:
            room = BLOCK_LEN - len(out) % BLOCK_LEN
            if room < CHUNK_HEADER_LEN:
                out += bytes(room)
                continue
            piece = payload[pos : pos + room - CHUNK_HEADER_LEN]
            pos += len(piece)
            last = pos >= len(payload)
            ctype = (FULL if last else FIRST) if first else (LAST if last else MIDDLE)
            crc = zlib.crc32(piece, zlib.crc32(bytes([ctype])))
            out += struct.pack("<IHB", crc, len(piece), ctype) + piece
            first = False
            if last:
                break
    assert len(out) >= FILE_HEADER_LEN
    return bytes(out)


@dataclass
class Template:
    """A run written by wandb, parsed into records, with the places to rewrite per run."""

    records: list  # wandb_internal_pb2.Record, in file order
    folder_time: str  # the `<YYYYmmdd_HHMMSS>` of wandb's run folder name
    n_epochs: int
    labels: list[str]
    # (epoch, value column, item or summary update) for each logged value to rewrite
    slots: list[tuple[int, int, object]]


def write_template(work_dir: Path, n_epochs: int, n_labels: int) -> Template:
    """Write one run of `n_epochs` x (`n_labels` labels + sps) with the real wandb library
    (offline, into `work_dir`) and parse it back into a `Template`."""
    with offline_wandb_env():
        import wandb

        labels = label_names(n_labels)
        keys = [LABEL_PREFIX + label for label in labels] + [KEY_SPS]
        rid = f"{USER}.template.seed0"
        run = wandb.init(
            project="bench",
            id=rid,
            name=rid,
            dir=str(work_dir),
            tags=[f"user:{USER}"],
            config={"seed": 0, "trainer": {"batch_size": STEPS_PER_EPOCH}},
            mode="offline",
            settings=offline_settings(),
        )
        run.define_metric(KEY_AGENT_STEP)
        run.define_metric("*", step_metric=KEY_AGENT_STEP)
        # placeholder values: epoch e, column c logs e * 1000 + c (found again below)
        for e in range(n_epochs):
            step = (e + 1) * STEPS_PER_EPOCH
            row = {key: float(e * 1000 + c) + 0.5 for c, key in enumerate(keys)}
            run.log({**row, KEY_AGENT_STEP: step}, step=step)
        run.finish()
        wandb.teardown()  # stop wandb's service process: the bench runs long after this
    (path,) = Path(work_dir).glob(f"wandb/offline-run-*-{rid}/run-{rid}.wandb")
    wait_for_exit_record(path, timeout_s=60.0)
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for _, payload in iter_records(path):
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    column = {key: c for c, key in enumerate(keys)}
    slots: list[tuple[int, int, object]] = []
    for record in records:
        kind = record.WhichOneof("record_type")
        entries = (
            record.history.item
            if kind == "history"
            else record.summary.update
            if kind == "summary"
            else ()
        )
        for entry in entries:
            key = entry.key or "/".join(entry.nested_key)
            if key in column:
                epoch = int(float(entry.value_json)) // 1000
                slots.append((epoch, column[key], entry))
    n_history = sum(r.WhichOneof("record_type") == "history" for r in records)
    if n_history != n_epochs or len({(e, c) for e, c, _ in slots}) != n_epochs * len(keys):
        raise RuntimeError(f"{path}: template has {n_history} history rows, not {n_epochs}")
    folder_time = path.parent.name.removeprefix("offline-run-").removesuffix(f"-{rid}")
    return Template(records, folder_time, n_epochs, labels, slots)


def derived_run_bytes(template: Template, name: str, seed: int, values: np.ndarray) -> bytes:
    """The template as the run `name` (id == name) with seed `seed` in its config and
    `values` (n_epochs, labels + 1) logged in place of the template's."""
    text = np.array([repr(v) for v in values.ravel().tolist()], dtype=object)
    text = text.reshape(values.shape)
    for epoch, col, entry in template.slots:
        entry.value_json = text[epoch, col]
    payloads = []
    for record in template.records:
        if record.HasField("_info"):
            record._info.stream_id = name
        if record.WhichOneof("record_type") == "run":
            record.run.run_id = name
            record.run.display_name = name
            for update in record.run.config.update:
                if update.key == "seed":
                    update.value_json = str(seed)
        payloads.append(record.SerializeToString())
    return frame_records(payloads)


def write_runs(template: Template, out_dir: Path, indices: range) -> list[Path]:
    """Write the bench runs numbered `indices` as `out_dir/wandb/offline-run-<time>-<id>/
    run-<id>.wandb` (each written to a temp name, then renamed); return their paths."""
    paths = []
    n_labels = len(template.labels)
    for index in indices:
        name, task, seed = run_name(index)
        values = run_values(task, seed, template.n_epochs, n_labels)
        folder = Path(out_dir) / "wandb" / f"offline-run-{template.folder_time}-{name}"
        (folder / "files").mkdir(parents=True, exist_ok=True)
        path = folder / f"run-{name}.wandb"
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".partial", delete=False) as f:
            f.write(derived_run_bytes(template, name, seed, values))
        Path(f.name).replace(path)
        paths.append(path)
    return paths


def link_runs(src_dir: Path, dst_dir: Path, names: list[str]) -> None:
    """Hard-link (copy if linking fails) the run folders of `names` from `src_dir/wandb`
    into `dst_dir/wandb`: a smaller set without writing the runs again."""
    for folder in sorted((Path(src_dir) / "wandb").iterdir()):
        name = folder.name.split("-", 3)[-1]
        if name in names:
            shutil.copytree(folder, Path(dst_dir) / "wandb" / folder.name, copy_function=_link)


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
