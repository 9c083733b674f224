"""mprnet_jax.torch_format: reading/writing .pth without torch, and refusing hostile files."""

import io
import os
import pickle
import pickletools
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mprnet_jax.torch_format import CheckpointError, load_pth, save_pth

HERE = Path(__file__).resolve().parent
LOCAL = HERE / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
MAGIC = 0x1950A86A20F9469CFC6C


def shared(name):
  p = SHARED / name
  if not p.is_file():
    pytest.fail(f"reference fixture {p} is missing: the shared fixtures folder must sit "
                "beside the repository (../shared/fixtures)")
  return p


# ---- hand-written pickle pieces (protocol 2), so tests control every opcode -------------
def G(module, name):
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def S(s):
  b = s.encode()
  return b"X" + struct.pack("<I", len(b)) + b


def I(n):
  return b"J" + struct.pack("<i", n)


def T(*parts):
  return b"(" + b"".join(parts) + b"t"


def tensor_op(key, numel, size, stride, legacy=False, view=None, size_op=None):
  sid = S("storage") + G("torch", "FloatStorage") + S(key) + S("cpu") + I(numel)
  if legacy:
    sid += T(S(view[0]), I(view[1]), I(view[2])) if view else b"N"
  size_op = size_op if size_op is not None else T(*map(I, size))
  return (G("torch._utils", "_rebuild_tensor_v2") + b"(" + b"(" + sid + b"tQ" + I(0) + size_op +
          T(*map(I, stride)) + b"\x89" + G("collections", "OrderedDict") + b")RtR")


def one_entry_dict(value_op):
  return b"\x80\x02}(" + S("w") + value_op + b"u."


def make_zip(path, pkl, storages=(), byteorder=b"little"):
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("ckpt/data.pkl", pkl)
    zf.writestr("ckpt/byteorder", byteorder)
    for key, data in storages:
      zf.writestr(f"ckpt/data/{key}", data)
    zf.writestr("ckpt/version", b"3\n")
  return path


def make_legacy(path, main, keys=(), blobs=(), sysinfo=None):
  info = sysinfo or {
      "protocol_version": 1001, "little_endian": True,
      "type_sizes": {"short": 2, "int": 4, "long": 4}
  }
  parts = [
      pickle.dumps(MAGIC, 2),
      pickle.dumps(1001, 2),
      pickle.dumps(info, 2), main,
      pickle.dumps(list(keys), 2)
  ]
  for blob in blobs:
    parts.append(struct.pack("<q", len(blob) // 4) + blob)
  Path(path).write_bytes(b"".join(parts))
  return path


class Evil:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


# ---- the real fixtures ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
  return load_pth(LOCAL / "tiny.pth")


def test_zip_and_legacy_fixtures_agree_bit_for_bit(tiny):
  legacy = load_pth(str(LOCAL / "tiny_legacy.pth"))
  assert set(tiny) == set(legacy) == {"epoch", "state_dict", "optimizer"}
  assert list(tiny["state_dict"]) == list(legacy["state_dict"])
  assert len(tiny["state_dict"]) == 226
  for k, a in tiny["state_dict"].items():
    b = legacy["state_dict"][k]
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), k
    assert a.flags.c_contiguous
  assert tiny["epoch"] == legacy["epoch"] == 7
  assert tiny["optimizer"] == legacy["optimizer"]


def test_tiny_known_keys_and_prelu(tiny):
  sd = tiny["state_dict"]
  assert type(sd) is dict and all(k.startswith("module.") for k in sd)
  w = sd["module.shallow_feat1.0.weight"]
  assert w.shape == (16, 3, 3, 3) and w.dtype == np.float32
  assert sd["module.shallow_feat1.1.CA.conv_du.0.weight"].shape == (4, 16, 1, 1)
  assert np.abs(w).max() > 0  # real data, not zeros
  prelu = [v for k, v in sd.items() if k.endswith("body.1.weight")]
  assert len(prelu) > 10 and all(v.shape == (1,) for v in prelu)
  assert {float(v[0]) for v in prelu} == {float(np.float32(0.17))}
  groups = tiny["optimizer"]["param_groups"]
  assert groups[0]["betas"] == (0.9, 0.999) and groups[0]["amsgrad"] is False
  assert groups[0]["params"][:3] == [0, 1, 2]


def test_denoise_fixture_has_metadata_and_no_prefix():
  ckpt = load_pth(LOCAL / "tiny_denoise.pth")  # its state_dict carries torch's _metadata (BUILD)
  sd = ckpt["state_dict"]
  assert type(sd) is dict and "shallow_feat1.0.weight" in sd
  assert {float(v[0]) for k, v in sd.items() if k.endswith("body.1.weight")
         } == {float(np.float32(0.21))}


def test_deraining_from_shared_fixtures():
  sd = load_pth(shared("deraining.pth"))["state_dict"]
  prelu = [k for k in sd if k.endswith("body.1.weight")]
  assert len(prelu) == 55
  assert {float(sd[k][0]) for k in prelu} == {float(np.float32(0.23))}
  # 3,637,249 parameters; the shared PReLU is listed 55 times in state_dict()
  assert sum(v.size for v in sd.values()) - 54 == 3_637_249
  assert sd["module.shallow_feat1.0.weight"].shape == (40, 3, 3, 3)


# ---- hostile files: nothing from the file may run -----------------------------------
def _payload_is_live(payload, marker):
  """Control: plain pickle really runs this payload (so the refusals below mean something)."""
  pickle.loads(payload)
  assert marker.exists()
  marker.unlink()


def _hostile_variants(tmp_path, marker):
  cmd = f"touch {marker}"
  evil = pickle.dumps(Evil(marker), 2)  # GLOBAL posix.system + REDUCE: the classic attack
  call = G(os.system.__module__, "system") + T(S(cmd)) + b"R"
  hidden_in_size = one_entry_dict(tensor_op("0", 4, None, (1,), size_op=call))
  hidden_in_size_legacy = one_entry_dict(tensor_op("0", 4, None, (1,), True, size_op=call))
  hidden_in_key = b"\x80\x02}(" + S("w") + (
      G("torch._utils", "_rebuild_tensor_v2") + b"((" + S("storage") + G("torch", "FloatStorage") +
      call + S("cpu") + I(4) + b"tQ" + I(0) + T(I(4)) + T(I(1)) + b"\x89" + b"}tR") + b"u."
  z = lambda n, p: make_zip(tmp_path / n, p, [("0", b"\0" * 16)])  # noqa: E731
  leg_main = lambda n, p: make_legacy(tmp_path / n, p)  # noqa: E731

  def raw(n, data):
    (tmp_path / n).write_bytes(data)
    return tmp_path / n

  return {
      "zip-top":
          z("a.pth", evil),
      "zip-in-tensor-size":
          z("b.pth", hidden_in_size),
      "zip-in-storage-id":
          z("c.pth", hidden_in_key),
      "legacy-main":
          leg_main("d.pth", evil),
      "legacy-in-tensor-size":
          leg_main("e.pth", hidden_in_size_legacy),
      "legacy-sysinfo":
          raw("f.pth",
              pickle.dumps(MAGIC, 2) + pickle.dumps(1001, 2) + evil),
      "legacy-key-list":
          raw(
              "g.pth",
              pickle.dumps(MAGIC, 2) + pickle.dumps(1001, 2) + pickle.dumps({}, 2) +
              pickle.dumps({}, 2) + evil),
  }


def test_malicious_checkpoints_are_refused_and_do_not_run(tmp_path):
  marker = tmp_path / "pwned"
  _payload_is_live(pickle.dumps(Evil(marker), 2), marker)
  for what, path in _hostile_variants(tmp_path, marker).items():
    with pytest.raises(CheckpointError) as e:
      load_pth(path)
    msg = str(e.value)
    assert path.name in msg and "\n" not in msg, what
    assert "system" in msg and "refuses" in msg, (what, msg)
    assert not marker.exists(), f"{what}: the command ran"


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("builtins", "exec"),
                                         ("subprocess", "Popen"),
                                         ("torch", "load"), ("os", "system"),
                                         ("numpy.core.multiarray", "_reconstruct"),
                                         ("torch._utils", "_rebuild_qtensor"),
                                         ("collections", "defaultdict"), ("builtins", "getattr")])
def test_other_globals_refused(tmp_path, module, name):
  pkl = one_entry_dict(G(module, name) + T(S("1+1")) + b"R")
  for path in (make_zip(tmp_path / "z.pth", pkl), make_legacy(tmp_path / "l.pth", pkl)):
    with pytest.raises(CheckpointError, match=rf"{path.name}: refuses to load '{module}\.{name}'"):
      load_pth(path)


def test_stack_global_and_ext_also_go_through_the_allow_list(tmp_path):
  stack_global = b"\x80\x04" + S("builtins") + S("eval") + b"\x93" + T(S("1")) + b"R."
  with pytest.raises(CheckpointError, match="refuses to load 'builtins.eval'"):
    load_pth(make_zip(tmp_path / "s.pth", stack_global))


@pytest.mark.parametrize("pid", [S("module"), T(S("module"), S("x")), T(S("storage"), S("x"))])
def test_non_storage_persistent_ids_refused(tmp_path, pid):
  with pytest.raises(CheckpointError, match="persistent id|storage id"):
    load_pth(make_zip(tmp_path / "p.pth", one_entry_dict(pid + b"Q")))


def test_build_cannot_rewrite_a_tensor(tmp_path):
  state = b"}(" + S("offset") + I(10**6) + b"u"
  pkl = one_entry_dict(tensor_op("0", 4, (4,), (1,)) + state + b"b")
  with pytest.raises(CheckpointError, match="p.pth"):
    load_pth(make_zip(tmp_path / "p.pth", pkl, [("0", b"\0" * 16)]))


def test_tensor_outside_its_storage_refused(tmp_path):
  pkl = one_entry_dict(tensor_op("0", 4, (100,), (1,)))
  with pytest.raises(CheckpointError, match="outside its storage"):
    load_pth(make_zip(tmp_path / "o.pth", pkl, [("0", b"\0" * 16)]))


def test_short_storage_is_truncation(tmp_path):
  pkl = one_entry_dict(tensor_op("0", 432, (16, 27), (27, 1)))
  with pytest.raises(CheckpointError,
                     match=r"x.pth: truncated \(storage 0 needs 1728 bytes, file has 100\)"):
    load_pth(make_zip(tmp_path / "x.pth", pkl, [("0", b"\0" * 100)]))


def test_compressed_storage_larger_than_the_file_is_refused_unread(tmp_path):
  pkl = one_entry_dict(tensor_op("0", 4, (4,), (1,)))
  path = tmp_path / "bomb.pth"
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
    zf.writestr("ckpt/data.pkl", pkl)
    zf.writestr("ckpt/data/0", b"\0" * (8 << 20))  # 8 MiB of zeros, about 8 KiB deflated
  assert path.stat().st_size < (1 << 20)
  with pytest.raises(CheckpointError,
                     match=r"bomb.pth: storage 0 would expand the \d+-byte file past its own size"):
    load_pth(path)


# ---- formats beyond the fixtures ----------------------------------------------------
def test_strided_tensor_and_legacy_storage_view(tmp_path):
  data = np.arange(12, dtype="<f4")
  # zip: a transposed (non-contiguous) view at offset 0
  pkl = one_entry_dict(tensor_op("0", 12, (4, 3), (1, 4)))
  got = load_pth(make_zip(tmp_path / "t.pth", pkl, [("0", data.tobytes())]))["w"]
  np.testing.assert_array_equal(got, data.reshape(3, 4).T)
  assert got.flags.c_contiguous
  # legacy: the tensor's storage is a view (offset 2, 6 elements) of root storage "r"
  main = one_entry_dict(tensor_op("r", 12, (2, 3), (3, 1), legacy=True, view=("v", 2, 6)))
  got = load_pth(make_legacy(tmp_path / "l.pth", main, ["r"], [data.tobytes()]))["w"]
  np.testing.assert_array_equal(got, data[2:8].reshape(2, 3))


def test_big_endian_zip(tmp_path):
  data = np.arange(6, dtype=">f4")
  pkl = one_entry_dict(tensor_op("0", 6, (2, 3), (3, 1)))
  got = load_pth(make_zip(tmp_path / "b.pth", pkl, [("0", data.tobytes())], byteorder=b"big"))["w"]
  np.testing.assert_array_equal(got, np.arange(6, dtype=np.float32).reshape(2, 3))


def test_dtype_globals_and_rebuild_v3_and_parameter(tmp_path):
  v = np.array([1.5, -2.0], "<f8")
  sid = S("storage") + G("torch", "UntypedStorage") + S("0") + S("cpu") + I(16)
  tensor = (G("torch._utils", "_rebuild_tensor_v3") + b"((" + sid + b"tQ" + I(0) + T(I(2)) +
            T(I(1)) + b"\x89" + b"}" + G("torch", "float64") + b"tR")
  param = G("torch._utils", "_rebuild_parameter") + b"(" + tensor + b"\x88}tR"
  got = load_pth(make_zip(tmp_path / "v3.pth", one_entry_dict(param), [("0", v.tobytes())]))["w"]
  assert got.dtype == np.float64 and got.tolist() == [1.5, -2.0]


# ---- files that are not checkpoints ------------------------------------------------
def _bad_files(tmp_path):
  tiny_zip = (LOCAL / "tiny.pth").read_bytes()
  tiny_legacy = (LOCAL / "tiny_legacy.pth").read_bytes()
  rng = np.random.default_rng(0)
  files = {
      "trunc_zip.pth": tiny_zip[:len(tiny_zip) // 2],
      "trunc_zip_tail.pth": tiny_zip[:-30],
      "trunc_legacy.pth": tiny_legacy[:len(tiny_legacy) // 2],
      "trunc_legacy_pickle.pth": tiny_legacy[:5000],
      "empty.pth": b"",
      "random.pth": b"\x13" + rng.bytes(4096),
      "image.png": b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + rng.bytes(200),
  }
  out = {}
  for name, data in files.items():
    (tmp_path / name).write_bytes(data)
    out[name] = tmp_path / name
  nopkl = tmp_path / "nopkl.pth"
  with zipfile.ZipFile(nopkl, "w") as zf:
    zf.writestr("ckpt/version", b"3\n")
  out["nopkl.pth"] = nopkl
  tar = tmp_path / "old_tar.pth"
  with tarfile.open(tar, "w") as tf:
    info = tarfile.TarInfo("storages")
    info.size = 4
    tf.addfile(info, io.BytesIO(b"abcd"))
  out["old_tar.pth"] = tar
  (tmp_path / "adir.pth").mkdir()
  out["adir.pth"] = tmp_path / "adir.pth"
  out["missing.pth"] = tmp_path / "missing.pth"
  return out


def test_bad_files_give_one_line_checkpoint_errors(tmp_path):
  expect = {
      "empty.pth": "empty", "random.pth": "not a PyTorch checkpoint",
      "image.png": "not a PyTorch checkpoint", "nopkl.pth": "data.pkl", "old_tar.pth": "tar",
      "adir.pth": "directory", "missing.pth": "no such file", "trunc_legacy.pth": "truncated",
      "trunc_legacy_pickle.pth": "truncated", "trunc_zip.pth": "zip", "trunc_zip_tail.pth": "zip"
  }
  for name, path in _bad_files(tmp_path).items():
    with pytest.raises(CheckpointError) as e:
      load_pth(path)
    msg = str(e.value)
    assert name in msg and "\n" not in msg, msg
    assert expect[name] in msg, msg
    assert isinstance(e.value, ValueError)


# ---- writing ------------------------------------------------------------------------
def test_save_load_round_trip_bit_identical(tmp_path):
  import ml_dtypes

  rng = np.random.default_rng(1)
  shared_arr = rng.standard_normal(3).astype(np.float32)
  sd = {
      "f32": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
      "f64": rng.standard_normal((2, 5)),
      "f16": rng.standard_normal(7).astype(np.float16),
      "bf16": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
      "i64": np.array([-(2**40), 0, 2**62], np.int64),
      "i32": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
      "i16": np.array([-7], np.int16),
      "i8": np.array([-8], np.int8),
      "u8": np.arange(256, dtype=np.uint8),
      "bool": np.array([[True, False]]),
      "scalar": np.array(3.25, np.float32),
      "empty": np.zeros((0, 3), np.float32),
      "transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T,
      "big_endian": np.arange(4, dtype=">i4"),
      "a": shared_arr,
      "b": shared_arr,
  }
  obj = {
      "state_dict": sd, "epoch": 12, "best": 31.5, "name": "mprnet \u00e9", "none": None,
      "flag": True, "big": 2**70, "neg": -5, "np_int": np.int64(4), "list": [1, [2.5, "x"]],
      "tuple": (0.9, 0.999), "optimizer": {
          "state": {0: {"step": np.array(3.0, np.float32)}}, "param_groups": [{"params": [0, 1]}]
      }
  }
  path = tmp_path / "out.pth"
  save_pth(obj, path)
  got = load_pth(path)
  assert list(got["state_dict"]) == list(sd)
  for k, a in sd.items():
    b = got["state_dict"][k]
    assert b.shape == a.shape and b.dtype == a.dtype.newbyteorder("="), k
    assert np.ascontiguousarray(a, b.dtype).tobytes() == b.tobytes(), k
  rest = {k: v for k, v in got.items() if k not in ("state_dict", "optimizer")}
  assert rest == {
      "epoch": 12, "best": 31.5, "name": "mprnet \u00e9", "none": None, "flag": True, "big": 2**70,
      "neg": -5, "np_int": 4, "list": [1, [2.5, "x"]], "tuple": (0.9, 0.999)
  }
  assert got["optimizer"]["state"][0]["step"] == 3.0

  # the layout torch expects: data.pkl, byteorder, version, 64-byte aligned raw storages
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    assert {"archive/data.pkl", "archive/byteorder", "archive/version"} <= set(names)
    assert zf.read("archive/byteorder") == b"little"
    # 17 arrays (16 + the optimizer's step); "a" and "b" are one object, so one storage
    assert sum(n.startswith("archive/data/") for n in names) == 16
    raw = path.read_bytes()
    for info in zf.infolist():
      assert info.compress_type == zipfile.ZIP_STORED
      n, e = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
      assert (info.header_offset + 30 + n + e) % 64 == 0, info.filename
    ops = list(pickletools.genops(zf.read("archive/data.pkl")))
  globals_ = {arg for op, arg, _ in ops if op.name == "GLOBAL"}
  assert globals_ <= {
      "collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch FloatStorage",
      "torch DoubleStorage", "torch HalfStorage", "torch BFloat16Storage", "torch LongStorage",
      "torch IntStorage", "torch ShortStorage", "torch CharStorage", "torch ByteStorage",
      "torch BoolStorage"
  }
  assert "collections OrderedDict" in globals_
  # only opcodes that torch.load(weights_only=True)'s own unpickler handles
  assert {op.name for op, _, _ in ops} <= {
      "PROTO", "STOP", "GLOBAL", "REDUCE", "MARK", "TUPLE", "EMPTY_TUPLE", "EMPTY_LIST",
      "EMPTY_DICT", "APPENDS", "SETITEMS", "BINPERSID", "BININT", "BININT1", "BININT2", "LONG1",
      "BINFLOAT", "BINUNICODE", "NONE", "NEWTRUE", "NEWFALSE"
  }
  assert sum(op.name == "BINPERSID" for op, _, _ in ops) == 17


def test_save_refuses_overwrite_and_leaves_nothing_on_failure(tmp_path):
  path = tmp_path / "w.pth"
  save_pth({"x": np.ones(2, np.float32)}, path)
  before = path.read_bytes()
  with pytest.raises(CheckpointError, match="w.pth.*exists"):
    save_pth({"x": np.zeros(2, np.float32)}, path)
  assert path.read_bytes() == before
  save_pth({"x": np.zeros(2, np.float32)}, path, overwrite=True)
  assert load_pth(path)["x"].tolist() == [0.0, 0.0]
  with pytest.raises(CheckpointError, match="set"):
    save_pth({"x": {1, 2}}, tmp_path / "bad.pth")
  with pytest.raises(CheckpointError, match="dtype"):
    save_pth({"x": np.array(["a"])}, tmp_path / "bad.pth")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth"]


@pytest.mark.parametrize("name", ["tiny.pth", "tiny_legacy.pth"])
def test_mutated_files_only_ever_raise_checkpoint_error(tmp_path, name):
  """Flip bytes in the pickle region and cut the file: whatever happens, either a clean
    load or a one-line CheckpointError, never another exception type."""
  raw = (LOCAL / name).read_bytes()
  rng = np.random.default_rng(123)
  path = tmp_path / "m.pth"
  for i in range(60):
    b = bytearray(raw)
    for _ in range(3):
      b[rng.integers(0, 40000)] = rng.integers(0, 256)
    path.write_bytes(bytes(b[:rng.integers(1, len(b))] if i % 4 == 0 else b))
    try:
      load_pth(path)
    except CheckpointError as e:
      assert "m.pth" in str(e) and "\n" not in str(e)
