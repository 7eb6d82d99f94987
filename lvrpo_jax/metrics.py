"""What every training stage reports: scalars, image grids, progress, speed.

  MetricsWriter                scalars and images to TensorBoard and to plain
                               files (metrics.jsonl, images/*.png)
  image_grid                   uint8 tiles, optionally captioned, in one image
  ProgressBar                  a tqdm bar on a terminal, a line every N% in logs
  Throughput                   step time, tokens/s and MFU from wall times
  peak_flops_per_device        MFU's denominator: the vendor bf16 dense peak
  transformer_flops_per_token  MFU's numerator: analytic training FLOPs
  saved_residuals              what jax.grad keeps for the backward pass
                               (the activation memory `model.remat` trades)

A training loop, sketched (`start` is the restored step, `flops` the FLOPs
per token times `tokens`, the tokens per step):

  speed = Throughput(tokens_per_step=tokens, num_devices=jax.device_count(),
                     flops_per_step=flops,
                     peak_flops_per_device=peak_flops_per_device())
  with (MetricsWriter(workdir, purge_step=start + 1) as writer,
        ProgressBar(total, 'pretrain', initial_step=start) as bar):
    for step in range(start + 1, total + 1):
      state, scalars = train_step(state, next(batches))
      loss = None
      # After the first (compiling) step, then every log_every steps.
      if step == start + 1 or step % log_every == 0:
        scalars = jax.device_get(scalars)  # Waits for the step to finish.
        writer.write(step, {**scalars, **speed.update(step)})
        loss = scalars['loss']
      bar.update(step, loss=loss)
"""

import contextlib
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax import ad_checkpoint
import numpy as np
from PIL import Image, ImageDraw, ImageFont
import tqdm

JSONL_FILE = 'metrics.jsonl'
IMAGES_DIR = 'images'
# Keys of every JSONL line, so no scalar may take these names.
_RESERVED = ('step', 'time', 'nonfinite')
# Characters of an image name that become '_' in its PNG file's name.
_UNSAFE_IN_FILE_NAMES = re.compile(r'[^\w.-]')


def _is_process_zero(process_index: int | None) -> bool:
  """Whether this process writes: only process 0 does in multi-host runs."""
  index = jax.process_index() if process_index is None else process_index
  return index == 0


class MetricsWriter:
  """Scalars and images of one stage, written by process 0 only.

  Files under `directory`:
    events.out.tfevents.*  TensorBoard scalars and images.
    metrics.jsonl          one JSON object per `write` call: 'step', 'time'
                           (wall clock, seconds since the epoch) and each
                           scalar. JSON has no NaN or infinity: a non-finite
                           scalar is written as null, and the line then also
                           has 'nonfinite', mapping its name to 'nan', 'inf'
                           or '-inf'. TensorBoard gets the value as it is.
    images/<name>_<step>.png  each image of `write_images`; characters of
                           `name` other than letters, digits, '.', '-' and
                           '_' (e.g. '/') become '_'.

  Other processes write nothing and create no directory; their calls return
  at once without reading the values, so no device is waited for.
  """

  def __init__(self, directory: str, *, process_index: int | None = None,
               purge_step: int | None = None):
    """Opens (appends to) the files of `directory`.

    Args:
      directory: where the files go; created if missing.
      process_index: this process's index; jax.process_index() if None.
      purge_step: on a resumed run, the first step it writes: TensorBoard
        events and JSONL lines of an earlier run at this step or later (from
        after its last checkpoint) are dropped, so curves do not double back.
    """
    self.directory = directory
    self.active = _is_process_zero(process_index)
    if not self.active:
      return
    # Imported here: a second or so that only the writing process pays.
    import tensorboardX  # pylint: disable=g-import-not-at-top
    os.makedirs(os.path.join(directory, IMAGES_DIR), exist_ok=True)
    path = os.path.join(directory, JSONL_FILE)
    if purge_step is not None and os.path.exists(path):
      _drop_lines_from(path, purge_step)
    self._summary = tensorboardX.SummaryWriter(directory,
                                               purge_step=purge_step)
    # Line-buffered: each line reaches the file when written, so a killed run
    # keeps every line but the one being written.
    self._jsonl = open(path, 'a', buffering=1, encoding='utf-8')

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes scalars of one step: one TensorBoard point each, one JSONL line.

    Args:
      step: the training step (int or integer scalar array).
      scalars: name -> a single number: float, int, numpy or jax scalar (or
        a one-element array). Names may hold '/' to group TensorBoard plots.
    """
    if not self.active:
      return
    step, now = int(step), time.time()
    reserved = [name for name in _RESERVED if name in scalars]
    if reserved:
      raise ValueError(f'scalar name {reserved[0]!r} is reserved (JSONL keys: '
                       f'{", ".join(_RESERVED)})')
    # All converted before any is written: a bad value writes nothing.
    numbers = {name: _to_number(name, v) for name, v in scalars.items()}
    line = {'step': step, 'time': now}
    nonfinite = {}
    for name, number in numbers.items():
      self._summary.add_scalar(name, float(number), step, walltime=now)
      if math.isfinite(number):
        line[name] = number
      else:
        line[name] = None
        nonfinite[name] = str(float(number))  # 'nan', 'inf' or '-inf'.
    if nonfinite:
      line['nonfinite'] = nonfinite
    self._jsonl.write(json.dumps(line, allow_nan=False) + '\n')

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Writes images of one step to TensorBoard and as PNG files.

    Args:
      step: the training step.
      images: name -> uint8 [H, W, 3] image, e.g. from `image_grid`.
    """
    if not self.active:
      return
    step, now = int(step), time.time()
    for name, image in images.items():
      image = np.asarray(image)
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'image {name!r} must be uint8 [H, W, 3], got '
                         f'{image.dtype} {list(image.shape)}')
      self._summary.add_image(name, image, step, walltime=now,
                              dataformats='HWC')
      file_name = f'{_UNSAFE_IN_FILE_NAMES.sub("_", name)}_{step}.png'
      Image.fromarray(image).save(
          os.path.join(self.directory, IMAGES_DIR, file_name))

  def flush(self) -> None:
    """Pushes buffered TensorBoard events to disk (JSONL lines already are)."""
    if self.active:
      self._summary.flush()
      self._jsonl.flush()

  def close(self) -> None:
    """Flushes and closes the files; later calls do nothing."""
    if self.active:
      self._summary.close()
      self._jsonl.close()
      self.active = False

  def __enter__(self) -> 'MetricsWriter':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _to_number(name: str, value: Any) -> int | float:
  """The Python number in a scalar value; integers stay integers."""
  array = np.asarray(value)
  if array.size != 1 or not (np.issubdtype(array.dtype, np.number) or
                             array.dtype == np.bool_):
    raise ValueError(f'scalar {name!r} must be one real number, got '
                     f'{array.dtype} {list(array.shape)}')
  number = array.reshape(()).item()
  if isinstance(number, complex):
    raise ValueError(f'scalar {name!r} is complex: {number}')
  return int(number) if isinstance(number, bool) else number


def _drop_lines_from(path: str, step: int) -> None:
  """Rewrites a JSONL file without its lines at `step` or later, nor a last
  line that a killed run left unfinished."""
  kept = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      if not line.endswith('\n'):
        break  # Unfinished: only ever the last line.
      if json.loads(line)['step'] < step:
        kept.append(line)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.writelines(kept)
  os.replace(path + '.tmp', path)  # Atomic: a crash keeps one whole file.


# Pixels around a caption's text: wider at the sides, so that the widest
# captions of neighbouring tiles do not run into each other.
_CAPTION_MARGIN_X, _CAPTION_MARGIN_Y = 6, 2


def image_grid(images, columns: int, captions: Sequence[str] | None = None,
               scale: int = 1) -> np.ndarray:
  """Tiles images row by row, each optionally over its caption.

  Every tile has the same size: the upscaled image, centred, over as many
  lines of text as the longest caption (split at '\\n'), drawn in black on
  white with PIL's default font; a tile widens to its widest caption line.
  Without captions the tiles abut: the grid is exactly rows*H*scale by
  columns*W*scale. Cells after the last image stay white.

  Args:
    images: uint8 [N, H, W, 3].
    columns: tiles per row (>= 1).
    captions: N strings, or None for no caption area.
    scale: integer upscaling of each image (nearest neighbour, >= 1).

  Returns:
    uint8 [rows * tile_height, columns * tile_width, 3], rows = ceil(N /
    columns).
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
    raise ValueError(f'images must be uint8 [N, H, W, 3], got {images.dtype} '
                     f'{list(images.shape)}')
  n = images.shape[0]
  if n < 1 or columns < 1 or scale < 1:
    raise ValueError(f'need N >= 1, columns >= 1, scale >= 1; got N={n}, '
                     f'columns={columns}, scale={scale}')
  if captions is not None and len(captions) != n:
    raise ValueError(f'{len(captions)} captions for {n} images')
  images = np.repeat(np.repeat(images, scale, axis=1), scale, axis=2)
  height, width = images.shape[1:3]
  lines = [c.split('\n') for c in captions] if captions is not None else []
  font = ImageFont.load_default()
  # Below every glyph's descender, plus a gap between lines.
  line_height = font.getbbox('Ahgjy|')[3] + 2
  tile_width, tile_height = width, height
  if lines:
    text_width = max(font.getlength(l) for ls in lines for l in ls)
    tile_width = max(width, math.ceil(text_width) + 2 * _CAPTION_MARGIN_X)
    tile_height += (max(map(len, lines)) * line_height +
                    2 * _CAPTION_MARGIN_Y)
  rows = -(-n // columns)
  grid = Image.new('RGB', (columns * tile_width, rows * tile_height), 'white')
  draw = ImageDraw.Draw(grid)
  for i, image in enumerate(images):
    top, left = (i // columns) * tile_height, (i % columns) * tile_width
    grid.paste(Image.fromarray(image), (left + (tile_width - width) // 2, top))
    for j, line in enumerate(lines[i] if lines else ()):
      draw.text((left + _CAPTION_MARGIN_X,
                 top + height + _CAPTION_MARGIN_Y + j * line_height),
                line, fill='black', font=font)
  return np.array(grid)


class _Discard:
  """A file that drops what is written: tqdm's live bar off a terminal."""

  def write(self, text: str) -> None:
    del text

  def flush(self) -> None:
    pass


class ProgressBar:
  """Progress of a training loop: steps, step/s, ETA and the latest loss.

  On a terminal this is a live tqdm bar. Elsewhere (CI, log files), where
  carriage returns garble logs, the bar renders to nowhere and the same text
  is printed as one line each time another `every_percent` of the steps is
  done, and at the last step. A resumed run starts at `initial_step`; rates
  and ETA count only the steps of this run. Only process 0 prints.
  """

  def __init__(self, total_steps: int, desc: str, *, initial_step: int = 0,
               every_percent: float = 10, file=None,
               process_index: int | None = None):
    """Starts the bar.

    Args:
      total_steps: the step the run ends at.
      desc: the bar's label, e.g. the stage name.
      initial_step: the step the run starts from (the restored one).
      every_percent: off a terminal, a line each time this share is done.
      file: where to print; sys.stderr if None.
      process_index: this process's index; jax.process_index() if None.
    """
    file = sys.stderr if file is None else file
    live = getattr(file, 'isatty', lambda: False)()
    self._file, self._live, self._total = file, live, total_steps
    self._every = max(1, math.ceil(total_steps * every_percent / 100))
    self._next_line = self._line_after(initial_step)
    self._bar = tqdm.tqdm(
        total=total_steps, desc=desc, initial=initial_step, unit='step',
        file=file if live else _Discard(), dynamic_ncols=live, ascii=not live,
        disable=not _is_process_zero(process_index))

  def update(self, step: int, loss=None) -> None:
    """Moves the bar to `step` (absolute), showing `loss` if given.

    Converting a jax `loss` waits for the step that computes it: pass one
    already fetched (e.g. at the logging interval); the bar keeps the last.
    """
    if self._bar.disable:
      return
    step = int(step)
    if loss is not None:
      self._bar.set_postfix(loss=f'{float(loss):.4g}', refresh=False)
    self._bar.update(step - self._bar.n)
    if not self._live and step >= self._next_line:
      self._file.write(str(self._bar) + '\n')
      self._file.flush()
      self._next_line = self._line_after(step)

  def _line_after(self, step: int) -> float:
    """The step of the next printed line: the next multiple of the interval,
    or the last step; none once that is printed."""
    if step >= self._total:
      return math.inf
    return min((step // self._every + 1) * self._every, self._total)

  def close(self) -> None:
    """Ends the bar (on a terminal, leaves its last state on screen)."""
    self._bar.close()

  def __enter__(self) -> 'ProgressBar':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class Throughput:
  """Training speed over the steps between two `update` calls.

  The first `update` only sets the starting point: call it right after the
  first step, so that step's compile time is never counted. Call `update` only
  where the host has waited for the step (e.g. after fetching its metrics):
  with jax's asynchronous dispatch, a time taken earlier measures dispatch,
  not compute.
  """

  def __init__(self, *, tokens_per_step: int, num_devices: int,
               flops_per_step: float | None = None,
               peak_flops_per_device: float | None = None,
               clock: Callable[[], float] = time.perf_counter):
    """Sets what a step does and what the hardware could do.

    Args:
      tokens_per_step: tokens of one global batch (all devices).
      num_devices: devices that run the step (jax.device_count()).
      flops_per_step: model FLOPs of one step over all devices, e.g.
        transformer_flops_per_token(...) * tokens_per_step; None: no FLOP
        rate, no MFU.
      peak_flops_per_device: FLOP/s of one device, from
        `peak_flops_per_device()`; None (CPU, unknown chip): no MFU.
      clock: seconds, monotonic; tests pass a fake one.
    """
    self._tokens, self._devices = tokens_per_step, num_devices
    self._flops, self._peak = flops_per_step, peak_flops_per_device
    self._clock = clock
    self._last = None  # (step, time) of the previous update.

  def update(self, step: int) -> dict[str, float]:
    """Speed since the previous update; {} at the first (or same step).

    Returns:
      'step_time_s' (mean seconds per step), 'steps_per_s', 'tokens_per_s';
      with FLOPs per step also 'tflops_per_s_per_device' (model FLOPs, not
      hardware FLOPs: rematerialization is not counted); with the peak too
      'mfu', model FLOPs utilization in [0, 1].
    """
    now, step = self._clock(), int(step)
    if self._last is None:
      self._last = (step, now)
      return {}
    last_step, last_time = self._last
    if step <= last_step:
      return {}
    step_time = (now - last_time) / (step - last_step)
    self._last = (step, now)
    speed = {'step_time_s': step_time, 'steps_per_s': 1 / step_time,
             'tokens_per_s': self._tokens / step_time}
    if self._flops is not None:
      per_device = self._flops / step_time / self._devices
      speed['tflops_per_s_per_device'] = per_device / 1e12
      if self._peak is not None:
        speed['mfu'] = per_device / self._peak
    return speed


# Dense bf16 peak FLOP/s per chip, from the vendors' pages: Cloud TPU system
# architecture pages (v4 275, v5e 197, v5p 459, v6e 918 TFLOP/s per chip) and
# NVIDIA's H100 / H200 / A100 datasheets, whose Tensor Core figures are "with
# sparsity": halved here (H100 SXM 1979 -> 989, PCIe 1513 -> 756, NVL 1671 ->
# 835; H200 SXM 1979 -> 989, NVL 1671 -> 835; A100 624 -> 312). Patterns are
# matched in order against the whole device_kind (as jax reports it, e.g. 'TPU
# v5 lite', 'NVIDIA H100 80GB HBM3'); the first match wins.
_PEAK_FLOPS = (
    (r'TPU v4', 275e12),
    (r'TPU v5( lite|e)', 197e12),
    (r'TPU v5p?', 459e12),
    (r'TPU v6( lite|e)', 918e12),
    (r'NVIDIA H100.*NVL.*', 835e12),
    (r'NVIDIA H100.*PCIe.*', 756e12),
    (r'NVIDIA H100.*', 989e12),
    (r'NVIDIA H200.*NVL.*', 835e12),
    (r'NVIDIA H200.*', 989e12),
    (r'NVIDIA A100.*', 312e12),
)


def peak_flops_per_device(device_kind: str | None = None) -> float | None:
  """Vendor bf16 dense peak FLOP/s of one device (see `_PEAK_FLOPS`).

  Args:
    device_kind: as jax.Device.device_kind; that of jax.devices()[0] if None.

  Returns:
    FLOP/s, or None on CPU and on chips not listed (MFU is then omitted).
  """
  if device_kind is None:
    device_kind = jax.devices()[0].device_kind
  for pattern, peak in _PEAK_FLOPS:
    if re.fullmatch(pattern, device_kind, flags=re.IGNORECASE):
      return peak
  return None


def transformer_flops_per_token(num_layers: int, hidden: int,
                                intermediate: int, num_heads: int,
                                num_kv_heads: int, head_dim: int, vocab: int,
                                seq_len: int) -> int:
  """Training FLOPs per token of a decoder with GQA and a SwiGLU MLP.

  PaLM's count (Chowdhery et al. 2022, appendix B): 6 N + 12 L H Q T, where
  a token's forward does 2 FLOPs per weight of each matmul and the backward
  twice that (6 N), and attention's two matmuls against T keys (QK^T and
  the weighted sum of values) cost 2 * 2 * H * Q * T forward per layer, times
  3 with the backward. Causal masking is not discounted (as in PaLM), so the
  MFU compares with PaLM's and MaxText's. N counts the matmul weights: per
  layer q, k, v, o projections and gate, up, down; plus the LM head (the
  embedding lookup is no matmul). Norms, RoPE and softmax are left out.

  Args:
    num_layers: L.
    hidden: model width D.
    intermediate: MLP width F.
    num_heads: query heads H.
    num_kv_heads: key/value heads K.
    head_dim: Q, per-head width.
    vocab: V, rows of the LM head.
    seq_len: T, keys each query attends to.

  Returns:
    FLOPs to train on one token (forward and backward).
  """
  attention_weights = hidden * head_dim * (2 * num_heads + 2 * num_kv_heads)
  mlp_weights = 3 * hidden * intermediate
  matmul_weights = num_layers * (attention_weights + mlp_weights)
  matmul_weights += hidden * vocab
  return 6 * matmul_weights + 12 * num_layers * num_heads * head_dim * seq_len


# A dtype as jax prints residuals, e.g. 'f32', 'bf16', 'i32', 'bool'.
_RESIDUAL = re.compile(r'(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\] (?P<what>.*)')
_DTYPES = {'bool': 1, 'f64': 8, 'f32': 4, 'bf16': 2, 'f16': 2, 'i64': 8,
           'i32': 4, 'i16': 2, 'i8': 1, 'u64': 8, 'u32': 4, 'u8': 1}


def saved_residuals(fn: Callable, *args) -> list[tuple[int, str]]:
  """What jax.grad(fn)(*args) keeps from the forward for the backward pass.

  Returns [(bytes, description)], one per residual, as
  `jax.ad_checkpoint.print_saved_residuals` reports it: the description
  says where it comes from ("from the argument ..." for inputs such as
  parameters, which exist anyway; "output of ..." for activations, with
  "named '...'" where a `checkpoint_name` tags it). The activations are
  what `model.remat` and its policy decide, independent of how XLA then
  schedules the program.
  """
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    ad_checkpoint.print_saved_residuals(fn, *args)
  saved = []
  for line in printed.getvalue().splitlines():
    match = _RESIDUAL.fullmatch(line.strip())
    if not match or match['dtype'] not in _DTYPES:
      raise ValueError(f'unexpected residual line {line!r}')
    dims = [int(d) for d in match['dims'].split(',') if d]
    saved.append((_DTYPES[match['dtype']] * math.prod(dims), match['what']))
  return saved
