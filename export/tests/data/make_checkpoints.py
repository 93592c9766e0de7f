"""Generate the checkpoint-reader fixtures in this folder.

Made with Python 3.11.7, torch 2.15.0+cu132, safetensors 0.8.0, numpy 2.4.6 (and the stdlib
`pickle` and `zipfile` for the hand-built archives). Run from anywhere:

    /opt/fxenv/bin/python export/tests/data/make_checkpoints.py

Every file is tiny (a few KB). `expected.json` records, for each fixture and tensor key, the dtype,
the shape and every element converted to float32 (exact: the values are exactly representable,
and Python's float repr round-trips), as torch itself sees them before saving. The Rust tests in
`export/src/checkpoint/mod.rs` compare, bit for bit, what `Checkpoint` reads against it. Files are
not byte-reproducible (zip timestamps, torch's serialization id), their contents are.

The malicious fixture is built with the stdlib pickler from a class whose `__reduce__` names
`os.system`; it is never loaded here (or anywhere).
"""

import json
import os
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
torch.manual_seed(20240607)

expected = {}


def record(name, tensors):
    """Remember what torch holds for `tensors` (a flat dict) under fixture `name`."""
    entry = {}
    for key, t in tensors.items():
        t = t.detach()
        entry[key] = {
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            "values": [float(v) for v in t.to(torch.float32).reshape(-1).tolist()],
        }
    expected[name] = entry


def save(obj, name, **kwargs):
    torch.save(obj, HERE / name, **kwargs)


# 1. A flat fp32 dict: a parameter (`_rebuild_parameter`), a scalar, an int64 tensor and a tied
#    weight (the same tensor under two keys, so the pickle refers to it through the memo).
embed = torch.randn(4, 3)
flat = {
    "embed.weight": embed,
    "lm_head.weight": embed,
    "proj.weight": torch.nn.Parameter(torch.randn(2, 4)),
    "proj.bias": torch.tensor([-0.0, 1.5]),
    "scale": torch.tensor(0.25),
    "position_ids": torch.arange(5, dtype=torch.int64).reshape(1, 5),
    "empty": torch.zeros(0, 3),
}
save(flat, "flat_f32.pt")
record("flat_f32.pt", flat)

# The same file written with pickle protocol 4 (FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL).
save(flat, "flat_f32_proto4.pt", pickle_protocol=4)
record("flat_f32_proto4.pt", flat)

# 2. A Lightning-style checkpoint: a real module's state_dict (an OrderedDict with `_metadata`,
#    pickled with BUILD) nested under "state_dict", in fp16, next to non-tensor entries.
module = torch.nn.Sequential(
    torch.nn.Linear(3, 4), torch.nn.GroupNorm(2, 4), torch.nn.Linear(4, 2)
).half()
with torch.no_grad():
    for p in module.parameters():
        p.copy_(torch.randn_like(p, dtype=torch.float32).half())
sd16 = module.state_dict()
save(
    {
        "state_dict": sd16,
        "global_step": 5,
        "epoch": 1,
        "hyper_parameters": {"lr": 1e-4, "name": "motion", "betas": (0.9, 0.999)},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": 3}}},
        "note": b"bytes under protocol 2 go through _codecs.encode",
    },
    "nested_f16.ckpt",
)
record("nested_f16.ckpt", sd16)

# 3. bf16.
bf = {
    "temporal.to_q.weight": torch.randn(3, 4).bfloat16(),
    "temporal.pos_encoder.pe": torch.randn(1, 6, 2).bfloat16(),
}
save(bf, "bf16.pt")
record("bf16.pt", bf)

# 4. Views: torch saves the whole underlying storage plus offset and strides.
base = torch.arange(15, dtype=torch.float32).reshape(3, 5) / 8
flatbase = torch.arange(10, dtype=torch.float32) * 0.5 - 2
views = {
    "base": base,
    "transposed": base.t(),  # shape (5, 3), stride (1, 5)
    "columns": base[:, 1::2],  # shape (3, 2), stride (5, 2), offset 1
    "tail": flatbase[3:],  # offset 3
    "window": flatbase[4:8].reshape(2, 2),  # offset 4
    "broadcast": torch.tensor([1.0, 2.0]).expand(3, 2),  # stride (0, 1)
}
assert not views["transposed"].is_contiguous()
assert views["tail"].storage_offset() == 3
save(views, "views.pt")
record("views.pt", views)

# 5. The same tensors as safetensors (contiguous copies; safetensors cannot share storage).
st = {}
for fixture in ("flat_f32.pt", "bf16.pt", "views.pt"):
    src = {"flat_f32.pt": flat, "bf16.pt": bf, "views.pt": views}[fixture]
    for key, t in src.items():
        if fixture == "flat_f32.pt" and key == "lm_head.weight":
            continue  # tied: safetensors refuses shared tensors
        st[key] = t.detach().contiguous().clone()
for key, t in sd16.items():
    st["sd16." + key] = t.contiguous().clone()
st["small_f64"] = torch.tensor([1.0 / 3.0, -2.5], dtype=torch.float64)
st["small_i32"] = torch.tensor([[-7, 3], [0, 2147483647]], dtype=torch.int32)
st["small_i16"] = torch.tensor([-300, 300], dtype=torch.int16)
st["small_i8"] = torch.tensor([-128, 127], dtype=torch.int8)
st["small_u8"] = torch.tensor([0, 255], dtype=torch.uint8)
st["small_bool"] = torch.tensor([True, False, True])
save_file(st, HERE / "tensors.safetensors", metadata={"format": "pt"})
record("tensors.safetensors", st)

# 6. A truncated copy of it (cut inside the data section).
data = (HERE / "tensors.safetensors").read_bytes()
(HERE / "truncated.safetensors").write_bytes(data[: len(data) - 10])

# 7. The legacy (pre-1.6, non-zip) serialization.
save({"w": torch.ones(2)}, "legacy.pt", _use_new_zipfile_serialization=False)


# 8. A malicious pickle in a torch-style zip: data.pkl does GLOBAL posix.system + REDUCE.
class Evil:
    def __reduce__(self):
        return (os.system, ("echo motionrt-test-should-never-run",))


evil_pkl = pickle.dumps({"weight": Evil()}, protocol=2)
assert b"system" in evil_pkl
with zipfile.ZipFile(HERE / "malicious.pt", "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", evil_pkl)
    z.writestr("archive/byteorder", "little")
    z.writestr("archive/version", "3\n")


def rewrite_zip(src_name, dst_name, prefix=None, compress=zipfile.ZIP_STORED, edit=None):
    """Copy a torch zip, optionally renaming its top folder, compressing, or editing entries."""
    with zipfile.ZipFile(HERE / src_name) as zin, zipfile.ZipFile(
        HERE / dst_name, "w", compress
    ) as zout:
        for info in zin.infolist():
            body = zin.read(info.filename)
            name = info.filename
            if prefix is not None:
                name = prefix + "/" + name.split("/", 1)[1]
            if edit is not None:
                body = edit(name, body)
            zout.writestr(name, body)


# 9. Torch zips written by other tools: another top folder name, deflated entries.
rewrite_zip("flat_f32.pt", "deflated.pt", prefix="mm_sd_v15", compress=zipfile.ZIP_DEFLATED)
record("deflated.pt", flat)

# 10. A storage shorter than the tensor that views it (offset + extent > storage size).
def cut_storage(name, body):
    return body[:8] if name.endswith("/data/0") else body


rewrite_zip("views.pt", "short_storage.pt", edit=cut_storage)

# 11. Not a checkpoint at all.
(HERE / "not_a_checkpoint.txt").write_text("this is a text file, not a checkpoint\n")

(HERE / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")

# Sanity: torch reads back what we recorded (the files we made ourselves, never malicious.pt).
# (flat_f32_proto4.pt is left out: torch 2.15's weights_only loader rejects FRAME.)
for name in ("flat_f32.pt", "bf16.pt", "views.pt"):
    loaded = torch.load(HERE / name, weights_only=True)
    for key, t in loaded.items():
        assert torch.equal(t, (flat | bf | views)[key].detach()), (name, key)
total = sum(p.stat().st_size for p in HERE.iterdir() if p.is_file())
print(f"wrote fixtures, {total} bytes in {HERE}")
