"""Where the time of a jitted step goes: a `jax.profiler` trace reduced to kernel classes.

`jax.profiler.trace(dir)` writes `dir/plugins/profile/RUN/HOST.xplane.pb` (an XSpace protobuf)
and `HOST.trace.json.gz` (the same events in Chrome's trace format);
`jax.profiler.ProfileData.from_file` reads the first without TensorBoard or xprof, and where a
jax lacks it the second is read instead. Every kernel of an XLA program carries an `hlo_op`
stat naming the HLO instruction it runs (and `hlo_module`): on the GPU on the device plane's
`Stream #N` lines (CUPTI), on the CPU on the host threads of `/host:CPU`. The optimised HLO of
the same executable (`compiled.as_text()`) says what each instruction is: a convolution (its
shapes, hence its FLOPs), a loop or reduction fusion, a copy or transpose, or work traced from
optax (the optimiser, from the HLO's stack frames). Joining the two gives the time per class,
its share of the step, and the floor each class would have at the card's FLOP peak or memory
bandwidth (the larger of FLOPs / peak and the bytes its operands and results occupy /
bandwidth: a lower bound, every byte moved once).

Classification is by HLO opcode and fusion body, not by kernel names, so it holds on any
backend; on the CPU the kernels are XLA:CPU's (bf16 convolutions run in float32 there), so a CPU
table checks the tool, never the GPU's proportions.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import re

CLASSES = ('convolution', 'matmul', 'loop fusion', 'reduction fusion', 'copy/transpose',
           'optimiser', 'other')

# Bytes per element of the HLO element types (4- and 2-bit types as fractions, not a byte).
_DTYPE_BYTES = {
    'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4,
    'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16, 's4': 0.5, 'u4': 0.5, 's2': 0.25,
    'u2': 0.25
}
_ARRAY = re.compile(r'\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+|f4e\w+)\[([\d,]*)\]')
_COMPUTATION = re.compile(r'^(ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$')
# Opcodes that launch no kernel of their own (aliases, tuples, control flow whose bodies are
# traced separately).
_NO_KERNEL = {
    'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast', 'after-all', 'partition-id',
    'replica-id', 'opt-barrier'
}
_MOVES = {'transpose', 'copy', 'copy-start', 'copy-done'}
_LAYOUT = _MOVES | {
    'bitcast', 'reshape', 'broadcast', 'parameter', 'constant', 'convert', 'slice', 'concatenate',
    'pad', 'dynamic-slice', 'dynamic-update-slice', 'tuple', 'get-tuple-element', 'reverse'
}
_REDUCTIONS = {'reduce', 'reduce-window', 'select-and-scatter', 'scatter', 'reduce-precision'}


@dataclasses.dataclass
class HloOp:
  """One top-level (kernel-launching) HLO instruction of an executable."""
  name: str
  opcode: str
  cls: str
  flops: float = 0.0
  bytes: float = 0.0
  label: str = ''  # convolutions: role, window and shapes


def _split_top(text: str, sep: str = ',') -> list[str]:
  """`text` split at `sep` outside brackets and quotes."""
  parts, depth, quote, start = [], 0, False, 0
  for i, ch in enumerate(text):
    if ch == '"':
      quote = not quote
    elif quote:
      continue
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == sep and depth == 0:
      parts.append(text[start:i].strip())
      start = i + 1
  parts.append(text[start:].strip())
  return [p for p in parts if p]


def _closing(text: str, start: int) -> int:
  """Index of the bracket closing the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in '([{':
      depth += 1
    elif text[i] in ')]}':
      depth -= 1
      if depth == 0:
        return i
  return len(text) - 1


def _arrays(shape: str, skip_scratch: bool = False) -> list[tuple[str, list[int]]]:
  found = [(d, [int(x) for x in dims.split(',') if x]) for d, dims in _ARRAY.findall(shape)]
  if skip_scratch and len(found) > 1:  # a custom call's u8 workspace is not data
    found = [a for a in found if a[0] != 'u8'] or found
  return found


def _nbytes(shape: str, skip_scratch: bool = False) -> float:
  total = 0.0
  for dtype, dims in _arrays(shape, skip_scratch):
    n = 1
    for d in dims:
      n *= d
    total += n * _DTYPE_BYTES.get(dtype, 1 if dtype.startswith(('f8', 'f4')) else 4)
  return total


@dataclasses.dataclass
class _Inst:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attrs: str


def _parse_instruction(line: str) -> _Inst | None:
  match = _INSTRUCTION.match(line)
  if not match:
    return None
  name, rest = match.groups()
  if rest.startswith('('):  # a tuple shape
    end = _closing(rest, 0)
    shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
  else:
    shape, _, rest = rest.partition(' ')
  paren = rest.find('(')
  if paren < 0:
    return None
  opcode = rest[:paren]
  end = _closing(rest, paren)
  operands = [p.split()[-1].lstrip('%') for p in _split_top(rest[paren + 1:end])]
  return _Inst(name, shape, opcode, operands, rest[end + 1:])


def _stack_files(text: str) -> dict[int, set[str]]:
  """stack_frame_id -> the source files of that frame and its parents (the HLO's tables)."""
  sections, current = collections.defaultdict(dict), None
  for line in text.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      current = line
      continue
    if current is None:
      continue
    if not line.strip():
      if sections[current]:
        current = None
      continue
    key, _, value = line.partition(' ')
    if not key.isdigit():
      current = None
      continue
    sections[current][int(key)] = value
  files = {k: v.strip('"') for k, v in sections['FileNames'].items()}
  location_file = {}
  for k, v in sections['FileLocations'].items():
    m = re.search(r'file_name_id=(\d+)', v)
    if m:
      location_file[k] = files.get(int(m.group(1)), '')
  frames = {}
  for k, v in sections['StackFrames'].items():
    loc = re.search(r'file_location_id=(\d+)', v)
    parent = re.search(r'parent_frame_id=(\d+)', v)
    frames[k] = (location_file.get(int(loc.group(1)), '') if loc else '',
                 int(parent.group(1)) if parent else 0)
  result = {}
  for k in frames:
    seen, chain, f = set(), set(), k
    while f in frames and f not in seen:
      seen.add(f)
      chain.add(frames[f][0])
      f = frames[f][1]
    result[k] = chain
  return result


def _conv_flops_and_label(inst: _Inst, shapes: dict[str, str], role: str) -> tuple[float, str]:
  """2 x multiply-adds of a convolution (or a cuDNN custom call holding one), and a label with
  its window and shapes. Holds for forward, data- and filter-gradient convolutions alike:
  every output element takes (input features per group) x (window) multiply-adds."""
  window = re.search(r'window=\{size=([\dx]+)', inst.attrs)
  labels = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', inst.attrs)
  out = _arrays(inst.shape, skip_scratch=True)
  operand_shapes = [_arrays(shapes.get(o, '')) for o in inst.operands[:2]]
  if not (window and labels and out and all(operand_shapes)):
    return 0.0, f'{role} {inst.name}'
  size = [int(x) for x in window.group(1).split('x')]
  rhs = operand_shapes[1][0][1]
  kernel_in = rhs[labels.group(2).index('i')] if 'i' in labels.group(2) else 1
  out_elems = 1
  for d in out[0][1]:
    out_elems *= d
  win = 1
  for s in size:
    win *= s
  flops = 2.0 * out_elems * kernel_in * win
  dims = lambda a: 'x'.join(map(str, a[0][1]))
  label = (f'{role} {window.group(1)}: {dims(operand_shapes[0])} * {dims(operand_shapes[1])} '
           f'-> {dims(out)} {out[0][0]}')
  return flops, label


def _conv_role(target: str) -> str:
  target = target.lower()
  if 'backwardfilter' in target:
    return 'wgrad'
  if 'backwardinput' in target:
    return 'dgrad'
  if 'forward' in target:
    return 'fwd'
  return 'conv'


def parse_hlo(text: str) -> tuple[str, dict[str, HloOp]]:
  """The module name and every kernel-launching instruction of an optimised HLO module text
  (`compiled.as_text()`), by name, classified, with FLOPs (convolutions and dots) and the
  bytes of its operands and result."""
  module = re.match(r'HloModule ([\w.\-]+)', text)
  stack_files = _stack_files(text)
  computations: dict[str, list[_Inst]] = {}
  current = None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = computations.setdefault(header.group(2), [])
      continue
    if line.startswith('}'):
      current = None
      continue
    if current is not None:
      inst = _parse_instruction(line)
      if inst:
        current.append(inst)
  shapes = {i.name: i.shape for insts in computations.values() for i in insts}
  called = set()
  for insts in computations.values():
    for i in insts:
      if i.opcode == 'fusion':
        called.update(re.findall(r'calls=%?([\w.\-]+)', i.attrs))

  def body(name, seen=None):
    """The instructions of a fused computation and of what it calls."""
    seen = seen if seen is not None else set()
    if name in seen:
      return []
    seen.add(name)
    result = []
    for i in computations.get(name, []):
      result.append(i)
      for sub in re.findall(r'(?:calls|to_apply)=%?([\w.\-]+)', i.attrs):
        if sub in computations and i.opcode not in _REDUCTIONS:
          result += body(sub, seen)
    return result

  def from_optax(insts):
    frames = [int(m) for i in insts for m in re.findall(r'stack_frame_id=(\d+)', i.attrs)]
    hits = sum(any('/optax/' in f for f in stack_files.get(fr, ())) for fr in frames)
    return bool(frames) and 2 * hits > len(frames)

  ops = {}
  for comp, insts in computations.items():
    if comp in called:
      continue  # fused bodies run inside their fusion's kernel
    for i in insts:
      if i.opcode in _NO_KERNEL:
        continue
      nbytes = (sum(_nbytes(shapes.get(o, '')) for o in i.operands) +
                _nbytes(i.shape, skip_scratch=True))
      inner = [i]
      if i.opcode == 'fusion':
        inner = []
        for sub in re.findall(r'calls=%?([\w.\-]+)', i.attrs):
          inner += body(sub)
      opcodes = {x.opcode for x in inner}
      flops, label, cls = 0.0, '', None
      target = re.search(r'custom_call_target="([^"]+)"', i.attrs)
      target = target.group(1) if target else ''
      if 'convolution' in opcodes or (i.opcode == 'custom-call' and 'conv' in target.lower()):
        conv = next((x for x in inner if x.opcode == 'convolution'), i)
        inner_shapes = {**shapes, **{x.name: x.shape for x in inner}}
        flops, label = _conv_flops_and_label(conv, inner_shapes, _conv_role(target))
        cls = 'convolution'
      elif 'dot' in opcodes or (i.opcode == 'custom-call' and
                                any(k in target.lower() for k in ('gemm', 'matmul', 'cublas'))):
        cls = 'matmul'
        dot = next((x for x in inner if x.opcode == 'dot'), None)
        if dot is not None:
          flops = _dot_flops(dot, {**shapes, **{x.name: x.shape for x in inner}})
      elif from_optax(inner):
        cls = 'optimiser'
      elif opcodes & _REDUCTIONS:
        cls = 'reduction fusion'
      elif opcodes <= _LAYOUT and opcodes & _MOVES:
        cls = 'copy/transpose'
      elif i.opcode in ('while', 'conditional', 'call', 'custom-call', 'all-reduce', 'all-gather',
                        'send', 'recv', 'infeed', 'outfeed', 'rng', 'rng-bit-generator', 'sort'):
        cls = 'other'
      else:
        cls = 'loop fusion'
      ops[i.name] = HloOp(i.name, i.opcode, cls, flops, nbytes, label)
  return (module.group(1) if module else ''), ops


def _dot_flops(dot: _Inst, shapes: dict[str, str]) -> float:
  out = _arrays(dot.shape)
  lhs = _arrays(shapes.get(dot.operands[0], ''))
  contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', dot.attrs)
  if not (out and lhs and contracting):
    return 0.0
  n = 1
  for d in out[0][1]:
    n *= d
  k = 1
  for d in (int(x) for x in contracting.group(1).split(',') if x):
    k *= lhs[0][1][d]
  return 2.0 * n * k


def latest_trace(log_dir: str) -> str:
  """The newest trace that `jax.profiler.trace(log_dir)` wrote: its `*.xplane.pb`, or where
  only the Chrome-format `*.trace.json.gz` is there, that."""
  for pattern in ('*.xplane.pb', '*.trace.json.gz'):
    found = glob.glob(os.path.join(log_dir, 'plugins', 'profile', '*', pattern))
    if found:
      return max(found, key=os.path.getmtime)
  raise FileNotFoundError(f'no *.xplane.pb or *.trace.json.gz under {log_dir}/plugins/profile')


def _planes_from_xplane(path: str):
  """[(plane, [(line, [(name, start_ns, duration_ns, stats)])])] of an XSpace file; only the
  device planes, or where they hold no events, the host CPU's (a GPU trace's host threads hold
  many events it does not need)."""
  import warnings

  import jax

  def read(planes):
    return [(plane.name, [(line.name, [(e.name, e.start_ns, e.duration_ns, dict(e.stats))
                                       for e in line.events])
                          for line in plane.lines])
            for plane in planes]

  with warnings.catch_warnings():
    # nanobind's stats type warns about its missing __module__ on first use; not ours to fix
    warnings.simplefilter('ignore', DeprecationWarning)
    data = jax.profiler.ProfileData.from_file(path)
    planes = list(data.planes)
    device = read(p for p in planes if p.name.startswith('/device:'))
    if any(events for _, lines in device for _, events in lines):
      return device
    return read(p for p in planes if p.name.startswith('/host:CPU'))


def _planes_from_json(path: str):
  """The same from a Chrome-format trace (`*.trace.json.gz`; times in microseconds)."""
  import gzip

  with gzip.open(path, 'rt') as f:
    events = json.load(f)['traceEvents']
  processes, threads = {}, {}
  for e in events:
    if e.get('ph') == 'M' and e.get('name') == 'process_name':
      processes[e['pid']] = e['args']['name']
    elif e.get('ph') == 'M' and e.get('name') == 'thread_name':
      threads[(e['pid'], e['tid'])] = e['args']['name']
  lines = collections.defaultdict(list)
  for e in events:
    if e.get('ph') == 'X':
      lines[(e['pid'], e.get('tid'))].append(
          (e.get('name', ''), 1e3 * e['ts'], 1e3 * e.get('dur', 0.0), e.get('args', {})))
  planes = collections.defaultdict(list)
  for (pid, tid), line_events in lines.items():
    planes[processes.get(pid, str(pid))].append((threads.get((pid, tid), str(tid)), line_events))
  return list(planes.items())


def kernel_times(trace_path: str) -> dict:
  """Time per HLO op of every XLA kernel in a trace (`.xplane.pb` or `.trace.json.gz`), per
  module: {'backend': 'gpu'|'cpu', 'modules': {module: {op: [ns, kernels]}}, 'unnamed':
  {kernel: [ns, count]}}. On the CPU, an op's time is its own (nested ops on the same thread
  subtracted)."""
  reader = _planes_from_json if trace_path.endswith('.json.gz') else _planes_from_xplane
  return _kernel_times(reader(trace_path))


def _kernel_times(planes) -> dict:
  modules = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
  unnamed = collections.defaultdict(lambda: [0.0, 0])
  device_events = []
  for plane, lines in planes:
    if not plane.startswith('/device:'):
      continue
    raw = [events for name, events in lines if name.startswith('Stream #')]
    # 'XLA Ops' is derived from the stream lines where a converter added it: never both.
    for events in raw or [events for name, events in lines if name == 'XLA Ops']:
      device_events += events
  if device_events:
    backend = 'gpu'
    for name, _, duration, stats in device_events:
      op = _op_name(stats.get('hlo_op'))
      # memcpy/memset and kernels launched outside XLA's annotations go by kernel name
      entry = modules[str(stats.get('hlo_module', ''))][op] if op else unnamed[name]
      entry[0] += duration
      entry[1] += 1
  else:
    backend = 'cpu'
    for plane, lines in planes:
      if not plane.startswith('/host:CPU'):
        continue
      for _, events in lines:
        spans = []
        for _, start, duration, stats in events:
          op = _op_name(stats.get('hlo_op'))
          if op:
            spans.append((start, start + duration, op, str(stats.get('hlo_module', ''))))
        for op, module, own in _self_times(spans):
          entry = modules[module][op]
          entry[0] += own
          entry[1] += 1
  return {
      'backend': backend, 'modules': {m: dict(v) for m, v in modules.items()},
      'unnamed': dict(unnamed)
  }


def _op_name(value) -> str:
  """The HLO instruction of an `hlo_op` stat (some versions add `%` or a long form)."""
  if not value:
    return ''
  text = str(value).strip().lstrip('%')
  return re.split(r'[\s=(]', text, maxsplit=1)[0]


def _self_times(spans):
  """(op, module, own time) for (start, end, op, module) spans of one thread, children's time
  subtracted from the span that encloses them."""
  spans = sorted(spans, key=lambda s: (s[0], -s[1]))
  result, stack = [], []  # stack of [end, op, module, own]

  def close(item):
    result.append((item[1], item[2], item[3]))

  for start, end, op, module in spans:
    while stack and stack[-1][0] <= start:
      close(stack.pop())
    if stack:
      stack[-1][3] -= min(end, stack[-1][0]) - start
    stack.append([end, op, module, end - start])
  while stack:
    close(stack.pop())
  return result


def reduce_profile(times: dict, module: str, ops: dict[str,
                                                       HloOp], *, steps: int, peak_tflops: float,
                   bandwidth_tbs: float, step_ms: float | None = None, top_convs: int = 12) -> dict:
  """The table: per class, time per step, share, kernels, FLOPs, bytes and the floor at peak;
  the convolutions by shape. `times` from `kernel_times`, `module`/`ops` from `parse_hlo`."""
  per_op = times['modules'].get(module)
  if per_op is None:  # names differ across versions (jit_step vs jit_step.1): match loosely
    candidates = [m for m in times['modules'] if m.split('.')[0] == module.split('.')[0]]
    if not candidates and times['modules']:  # else the module that took the most time
      candidates = [
          max(times['modules'], key=lambda m: sum(ns for ns, _ in times['modules'][m].values()))
      ]
    per_op = {}
    for m in candidates:
      for op, (ns, n) in times['modules'][m].items():
        entry = per_op.setdefault(op, [0.0, 0])
        entry[0] += ns
        entry[1] += n
  classes = {
      c: dict(ms=0.0, kernels=0, flops=0.0, bytes=0.0, floor_ms=0.0, unmatched_ms=0.0)
      for c in CLASSES
  }
  convs = {}
  peak_flops, bandwidth = peak_tflops * 1e12, bandwidth_tbs * 1e12
  for name, (ns, count) in per_op.items():
    op = ops.get(name)
    cls = op.cls if op else _guess_class(name)
    row = classes[cls]
    ms = ns / 1e6 / steps
    row['ms'] += ms
    row['kernels'] += count / steps
    if op is None:
      row['unmatched_ms'] += ms
      continue
    # Once per step: the step is straight-line code (no while loops), and one op can show as
    # several kernels (a GPU convolution and its helpers; a CPU op split across threads).
    runs = 1
    row['flops'] += op.flops * runs
    row['bytes'] += op.bytes * runs
    floor = max(op.flops / peak_flops, op.bytes / bandwidth) * 1e3 * runs
    row['floor_ms'] += floor
    if cls == 'convolution':
      conv = convs.setdefault(op.label or name, dict(ms=0.0, calls=0, flops=0.0, floor_ms=0.0))
      conv['ms'] += ms
      conv['calls'] += runs
      conv['flops'] += op.flops * runs
      conv['floor_ms'] += floor
  # Kernels no HLO op names (copies, memsets, foreign kernels) are 'other' or copies.
  for kernel, (ns, count) in times.get('unnamed', {}).items():
    cls = 'copy/transpose' if 'memcpy' in kernel.lower() else 'other'
    classes[cls]['ms'] += ns / 1e6 / steps
    classes[cls]['kernels'] += count / steps
    classes[cls]['unmatched_ms'] += ns / 1e6 / steps
  total = sum(r['ms'] for r in classes.values())
  for row in classes.values():
    row['share'] = row['ms'] / total if total else 0.0
  conv_rows = sorted(({'shape': k, **v} for k, v in convs.items()), key=lambda r: -r['ms'])
  for row in conv_rows:
    row['share'] = row['ms'] / total if total else 0.0
    row['tflops'] = row['flops'] / (row['ms'] / 1e3) / 1e12 if row['ms'] else 0.0
  return {
      'backend': times['backend'],
      'module': module,
      'steps': steps,
      'kernel_ms_per_step': total,
      'step_ms': step_ms,
      'peak_tflops': peak_tflops,
      'bandwidth_tbs': bandwidth_tbs,
      'floor_ms_per_step': sum(r['floor_ms'] for r in classes.values()),
      'classes': classes,
      'convolutions': conv_rows[:top_convs],
      'convolution_shapes': len(conv_rows),
      'other_modules': sorted(m for m in times['modules'] if m != module),
  }


def _guess_class(name: str) -> str:
  """A class from an op name alone (an op missing from the HLO text)."""
  lower = name.lower()
  if 'conv' in lower:
    return 'convolution'
  if any(k in lower for k in ('gemm', 'dot', 'matmul')):
    return 'matmul'
  if 'reduce' in lower:
    return 'reduction fusion'
  if any(k in lower for k in ('transpose', 'copy')):
    return 'copy/transpose'
  if 'fusion' in lower:
    return 'loop fusion'
  return 'other'


def markdown(report: dict, title: str = '') -> str:
  """The report as markdown: the class table, then the convolutions by shape."""
  busy = ''
  if report.get('step_ms'):
    busy = (f', step {report["step_ms"]:.2f} ms wall (kernels busy '
            f'{100 * report["kernel_ms_per_step"] / report["step_ms"]:.0f}% of it)')
  warning = [f'> {report["warning"]}', ''] if report.get('warning') else []
  lines = warning + [
      f'**{title or report["module"]}** ({report["backend"]}, {report["steps"]} profiled '
      f'steps; kernel time {report["kernel_ms_per_step"]:.2f} ms per step{busy}; '
      f'floor at {report["peak_tflops"]:g} TFLOP/s and {report["bandwidth_tbs"]:g} TB/s: '
      f'{report["floor_ms_per_step"]:.2f} ms)', '',
      '| class | ms / step | share | kernels / step | GFLOP / step | GB / step | '
      'floor at peak (ms) | time / floor |', '| --- | --- | --- | --- | --- | --- | --- | --- |'
  ]
  for name, row in report['classes'].items():
    if not row['ms'] and not row['kernels']:
      continue
    ratio = f'{row["ms"] / row["floor_ms"]:.1f}×' if row['floor_ms'] else '—'
    lines.append(f'| {name} | {row["ms"]:.3f} | {100 * row["share"]:.1f}% | '
                 f'{row["kernels"]:.0f} | {row["flops"] / 1e9:.2f} | {row["bytes"] / 1e9:.3f} | '
                 f'{row["floor_ms"]:.3f} | {ratio} |')
  if report['convolutions']:
    lines += [
        '', f'Convolutions by shape (top {len(report["convolutions"])} of '
        f'{report["convolution_shapes"]}):', '',
        '| convolution (role window: input * kernel -> output) | calls / step | '
        'ms / step | share | TFLOP/s | time / floor |', '| --- | --- | --- | --- | --- | --- |'
    ]
    for row in report['convolutions']:
      ratio = f'{row["ms"] / row["floor_ms"]:.1f}×' if row['floor_ms'] else '—'
      lines.append(f'| `{row["shape"]}` | {row["calls"]} | {row["ms"]:.3f} | '
                   f'{100 * row["share"]:.1f}% | {row["tflops"]:.2f} | {ratio} |')
  return '\n'.join(lines) + '\n'


def profile_report(log_dir: str, hlo_text: str, *, steps: int, peak_tflops: float = 790.0,
                   bandwidth_tbs: float = 4.8, step_ms: float | None = None) -> dict:
  """`reduce_profile` of the newest trace under `log_dir` against the executable's HLO."""
  module, ops = parse_hlo(hlo_text)
  trace = latest_trace(log_dir)
  try:
    times = kernel_times(trace)
  except (AttributeError, ImportError):  # a jax without ProfileData: its Chrome trace instead
    trace = max(glob.glob(os.path.join(os.path.dirname(trace), '*.trace.json.gz')),
                key=os.path.getmtime)
    times = kernel_times(trace)
  report = reduce_profile(times, module, ops, steps=steps, peak_tflops=peak_tflops,
                          bandwidth_tbs=bandwidth_tbs, step_ms=step_ms)
  report['trace'] = trace
  return report


def dumps(report: dict) -> str:
  return json.dumps(report, indent=1, default=float)
