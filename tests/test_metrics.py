"""Tests of lvrpo_jax.metrics: files written, grid layout, speed and FLOPs.

TensorBoard event files are read back without tensorboard or tensorflow
(neither is a dependency): each is a TFRecord file, records framed as
[length uint64][masked crc32c of length][data][masked crc32c of data], each
record one `Event` proto, parsed with tensorboardX's own generated protos.
"""

import io
import json
import math
import pathlib
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from lvrpo_jax import metrics


def _read_events(directory: pathlib.Path) -> list[event_pb2.Event]:
  """Every event of the TensorBoard files in `directory`, file by file."""
  events = []
  paths = sorted(directory.glob('events.out.tfevents.*'))
  assert paths, f'no event file in {directory}'
  for path in paths:
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      header = data[offset:offset + 8]
      (length,) = struct.unpack('<Q', header)
      (header_crc,) = struct.unpack('<I', data[offset + 8:offset + 12])
      record = data[offset + 12:offset + 12 + length]
      (record_crc,) = struct.unpack(
          '<I', data[offset + 12 + length:offset + 16 + length])
      assert (header_crc, record_crc) == (masked_crc32c(header),
                                          masked_crc32c(record))
      events.append(event_pb2.Event.FromString(record))
      offset += 16 + length
  return events


def _scalars(directory) -> dict[tuple[str, int], float]:
  """(tag, step) -> value of every scalar in the event files."""
  return {(v.tag, e.step): v.simple_value for e in _read_events(directory)
          for v in e.summary.value if v.WhichOneof('value') == 'simple_value'}


def _strict_json(line: str) -> dict:
  """A JSONL line parsed as standard JSON: NaN or Infinity fail."""
  def reject(constant):
    raise ValueError(f'non-standard JSON constant {constant}')
  return json.loads(line, parse_constant=reject)


def test_scalars_go_to_jsonl_and_tensorboard(tmp_path):
  before = time.time()
  with metrics.MetricsWriter(str(tmp_path)) as writer:
    writer.write(1, {'train/loss': jnp.float32(0.5), 'lr': np.float64(1e-3),
                     'tokens': np.int32(1024)})
    writer.write(jnp.int32(2), {'train/loss': float('nan'),
                                'grad_norm': jnp.array([jnp.inf]),
                                'neg': -math.inf, 'ok': 2.0})
  after = time.time()
  lines = [_strict_json(l) for l in
           (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert len(lines) == 2
  assert all(before <= line.pop('time') <= after for line in lines)
  assert lines[0] == {'step': 1, 'train/loss': 0.5, 'lr': 1e-3,
                      'tokens': 1024}
  assert isinstance(lines[0]['tokens'], int)
  assert lines[1] == {'step': 2, 'train/loss': None, 'grad_norm': None,
                      'neg': None, 'ok': 2.0,
                      'nonfinite': {'train/loss': 'nan', 'grad_norm': 'inf',
                                    'neg': '-inf'}}
  scalars = _scalars(tmp_path)
  assert scalars.keys() == {('train/loss', 1), ('lr', 1), ('tokens', 1),
                            ('train/loss', 2), ('grad_norm', 2), ('neg', 2),
                            ('ok', 2)}
  assert scalars['train/loss', 1] == 0.5
  assert scalars['lr', 1] == pytest.approx(1e-3)  # Stored as float32.
  assert scalars['tokens', 1] == 1024
  assert math.isnan(scalars['train/loss', 2])
  assert scalars['grad_norm', 2] == math.inf
  assert scalars['neg', 2] == -math.inf


def test_images_go_to_png_files_and_tensorboard(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
  with metrics.MetricsWriter(str(tmp_path)) as writer:
    writer.write_images(30, {'eval/samples': image, 'plain': image[:2]})
  with Image.open(tmp_path / 'images' / 'eval_samples_30.png') as png:
    assert png.mode == 'RGB'
    np.testing.assert_array_equal(np.asarray(png), image)
  with Image.open(tmp_path / 'images' / 'plain_30.png') as png:
    np.testing.assert_array_equal(np.asarray(png), image[:2])
  values = {(v.tag, e.step): v.image for e in _read_events(tmp_path)
            for v in e.summary.value if v.WhichOneof('value') == 'image'}
  assert values.keys() == {('eval/samples', 30), ('plain', 30)}
  stored = values['eval/samples', 30]
  assert (stored.height, stored.width, stored.colorspace) == (6, 10, 3)
  with Image.open(io.BytesIO(stored.encoded_image_string)) as png:
    np.testing.assert_array_equal(np.asarray(png.convert('RGB')), image)


def test_bad_values_fail_with_their_name(tmp_path):
  with metrics.MetricsWriter(str(tmp_path)) as writer:
    with pytest.raises(ValueError, match="'step' is reserved"):
      writer.write(1, {'step': 1.0})
    with pytest.raises(ValueError, match=r"'loss' must be one real number"):
      writer.write(1, {'ok': 1.0, 'loss': np.ones(2)})
    with pytest.raises(ValueError, match=r"'grid' must be uint8 \[H, W, 3\]"):
      writer.write_images(1, {'grid': np.zeros((4, 4, 3), np.float32)})
  # Nothing of the failed calls was written, not even the valid 'ok'.
  assert not (tmp_path / 'metrics.jsonl').read_text()
  assert not _scalars(tmp_path)


def test_other_processes_write_nothing(tmp_path):
  directory = tmp_path / 'run'
  with metrics.MetricsWriter(str(directory), process_index=1) as writer:
    # Values are not even read: an object that is no number passes.
    writer.write(1, {'loss': object()})
    writer.write_images(1, {'grid': object()})
    writer.flush()
  assert not directory.exists()


def test_purge_step_drops_what_a_crashed_run_wrote_after_it(tmp_path):
  with metrics.MetricsWriter(str(tmp_path)) as writer:
    for step in range(1, 5):
      writer.write(step, {'loss': float(step)})
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 5, "lo')  # Killed while writing step 5.
  # A restart from a checkpoint at step 2 writes step 3 again.
  with metrics.MetricsWriter(str(tmp_path), purge_step=3) as writer:
    writer.write(3, {'loss': 30.0})
  lines = [_strict_json(l) for l in
           (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(l['step'], l['loss']) for l in lines] == [(1, 1.), (2, 2.),
                                                     (3, 30.)]
  # TensorBoard hides earlier events at or after a START marker's step.
  starts = [e.step for e in _read_events(tmp_path)
            if e.session_log.status == event_pb2.SessionLog.START]
  assert starts == [3]


def test_image_grid_layout_without_captions():
  images = np.arange(5 * 2 * 3 * 3, dtype=np.uint8).reshape(5, 2, 3, 3)
  grid = metrics.image_grid(images, columns=3, scale=2)
  assert grid.dtype == np.uint8 and grid.shape == (2 * 4, 3 * 6, 3)
  for i, image in enumerate(images):
    top, left = (i // 3) * 4, (i % 3) * 6
    np.testing.assert_array_equal(
        grid[top:top + 4, left:left + 6],
        np.repeat(np.repeat(image, 2, 0), 2, 1), err_msg=str(i))
  assert (grid[4:, 12:] == 255).all()  # The sixth cell is empty.


def test_image_grid_captions_sit_under_centred_images():
  images = np.zeros((3, 12, 12, 3), np.uint8)  # Black: no white text pixels.
  size = 24  # Each image, upscaled twice.
  one_line = metrics.image_grid(images, 2, ['a', 'b', ''], scale=2)
  two_lines = metrics.image_grid(images, 2, ['a', 'b\nc', ''], scale=2)
  wide = metrics.image_grid(images, 2, ['a' * 60, 'b', ''], scale=2)
  for grid in (one_line, two_lines, wide):
    assert grid.dtype == np.uint8 and grid.shape[0] % 2 == 0
  # A second line makes every tile taller; short captions keep the image
  # width, a long one widens every tile.
  one_height, two_height = one_line.shape[0] // 2, two_lines.shape[0] // 2
  assert size < one_height < two_height
  assert one_line.shape[1] == two_lines.shape[1] == 2 * size
  assert wide.shape[1] % 2 == 0 and wide.shape[1] > 2 * size
  tile_height, tile_width = wide.shape[0] // 2, wide.shape[1] // 2
  assert tile_height == one_height
  for i in range(3):
    top, left = (i // 2) * tile_height, (i % 2) * tile_width
    centre = left + (tile_width - size) // 2
    assert (wide[top:top + size, centre:centre + size] == 0).all(), i
    caption = wide[top + size:top + tile_height, left:left + tile_width]
    assert (caption != 255).any() == (i < 2), i  # The third one is empty.
  # The second line is drawn inside the taller tile, below the first.
  def text_rows(grid, height):
    caption = grid[size:height, size:2 * size]  # The second tile's.
    return np.nonzero((caption != 255).any(axis=(1, 2)))[0]
  assert text_rows(two_lines, two_height).max() > (
      text_rows(one_line, one_height).max())


def test_image_grid_rejects_bad_input():
  with pytest.raises(ValueError, match=r'uint8 \[N, H, W, 3\]'):
    metrics.image_grid(np.zeros((2, 4, 4, 3), np.float32), 2)
  with pytest.raises(ValueError, match='1 captions for 2 images'):
    metrics.image_grid(np.zeros((2, 4, 4, 3), np.uint8), 2, ['a'])


class _Clock:
  """Fake seconds: each call returns the next of `times`."""

  def __init__(self, *times):
    self._times = iter(times)

  def __call__(self):
    return next(self._times)


def test_throughput_skips_the_compile_step_and_computes_mfu():
  speed = metrics.Throughput(
      tokens_per_step=1000, num_devices=2, flops_per_step=8e12,
      peak_flops_per_device=4e12, clock=_Clock(100.0, 108.0, 109.0, 114.0))
  assert speed.update(1) == {}  # Step 1 (compile) ended at t=100.
  # Steps 2-5 in 8 s: 2 s a step, 500 tokens/s; 8e12 / 2 s / 2 devices =
  # 2e12 FLOP/s a device, half the 4e12 peak.
  assert speed.update(5) == pytest.approx({
      'step_time_s': 2.0, 'steps_per_s': 0.5, 'tokens_per_s': 500.0,
      'tflops_per_s_per_device': 2.0, 'mfu': 0.5})
  assert speed.update(5) == {}  # No step since: nothing to measure.
  # The window restarts at each update: step 6 alone took 114 - 108 = 6 s.
  assert speed.update(6)['step_time_s'] == pytest.approx(6.0)


def test_throughput_omits_what_it_cannot_know():
  no_peak = metrics.Throughput(tokens_per_step=10, num_devices=1,
                               flops_per_step=1e12, clock=_Clock(0., 1.))
  no_peak.update(0)
  assert no_peak.update(1).keys() == {'step_time_s', 'steps_per_s',
                                      'tokens_per_s',
                                      'tflops_per_s_per_device'}
  no_flops = metrics.Throughput(tokens_per_step=10, num_devices=1,
                                peak_flops_per_device=1e12,
                                clock=_Clock(0., 1.))
  no_flops.update(0)
  assert no_flops.update(1).keys() == {'step_time_s', 'steps_per_s',
                                       'tokens_per_s'}


@pytest.mark.parametrize('kind, peak', [
    ('TPU v4', 275e12), ('TPU v4 lite', None), ('TPU v5 lite', 197e12),
    ('TPU v5e', 197e12), ('TPU v5', 459e12), ('TPU v5p', 459e12),
    ('TPU v6 lite', 918e12), ('TPU v6e', 918e12),
    ('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12),
    ('NVIDIA H100 NVL', 835e12), ('NVIDIA H200', 989e12),
    ('NVIDIA H200 NVL', 835e12), ('NVIDIA A100-SXM4-80GB', 312e12),
    ('NVIDIA A100-PCIE-40GB', 312e12), ('cpu', None),
    ('NVIDIA GeForce RTX 4090', None)])
def test_peak_flops_by_device_kind(kind, peak):
  assert metrics.peak_flops_per_device(kind) == peak


def test_peak_flops_is_unknown_on_cpu():
  assert metrics.peak_flops_per_device() is None  # conftest: CPU devices.


def test_transformer_flops_per_token_by_hand():
  # L=2, D=8, F=16, H=4, K=2, E=2, V=10, T=5. Per layer: q 8*8 + k 8*4 +
  # v 8*4 + o 8*8 = 192, MLP 3*8*16 = 384: 576, twice: 1152; LM head 80.
  # 6 * 1232 = 7392; attention 12 * L * H * E * T = 12*2*4*2*5 = 960.
  assert metrics.transformer_flops_per_token(
      num_layers=2, hidden=8, intermediate=16, num_heads=4, num_kv_heads=2,
      head_dim=2, vocab=10, seq_len=5) == 7392 + 960


def test_transformer_flops_match_qwen2_7b_parameter_count():
  # Qwen2-7B's report lists 6.53B non-embedding parameters: the matmul
  # weights of its layers (biases and norms are a few 1e5 more).
  def flops(vocab, seq_len):
    return metrics.transformer_flops_per_token(
        num_layers=28, hidden=3584, intermediate=18_944, num_heads=28,
        num_kv_heads=4, head_dim=128, vocab=vocab, seq_len=seq_len)
  layers = flops(vocab=0, seq_len=0) / 6
  assert round(layers / 1e9, 2) == 6.53
  # The LM head adds 6 D V, and attention 12 L H E a key.
  assert flops(152_064, 0) - flops(0, 0) == 6 * 3584 * 152_064
  assert flops(0, 4096) - flops(0, 0) == 12 * 28 * 28 * 128 * 4096


class _Log(io.StringIO):
  """A log file (no terminal)."""

  def isatty(self):
    return False


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def test_progress_bar_prints_a_line_every_tenth_off_a_terminal():
  log = _Log()
  with metrics.ProgressBar(100, 'train', initial_step=35, file=log,
                           process_index=0) as bar:
    for step in range(36, 101):
      bar.update(step, loss=jnp.float32(1.5) if step == 50 else None)
  lines = log.getvalue().splitlines()
  # A resumed run starts at 35: lines at 40, 50, ..., 100; no carriage return.
  assert [l.split('|')[2].split()[0] for l in lines] == [
      f'{s}/100' for s in range(40, 101, 10)]
  assert all(l.startswith('train:') and '\r' not in l for l in lines)
  assert 'loss' not in lines[0] and all('loss=1.5' in l for l in lines[1:])
  assert 'step/s' in lines[-1]


def test_progress_bar_ends_with_a_line_at_the_last_step():
  log = _Log()
  with metrics.ProgressBar(25, 'eval', file=log, process_index=0) as bar:
    for step in range(1, 26):
      bar.update(step)
    bar.update(25)  # Once more at the end: no second last line.
  # Every 10% of 25 steps is every 3 steps, then the last step.
  assert [l.split('|')[2].split()[0] for l in log.getvalue().splitlines()] == [
      f'{s}/25' for s in (*range(3, 25, 3), 25)]


def test_progress_bar_is_live_on_a_terminal_and_silent_elsewhere():
  terminal = _Terminal()
  with metrics.ProgressBar(10, 'train', file=terminal,
                           process_index=0) as bar:
    bar.update(10, loss=0.25)
  assert '\r' in terminal.getvalue() and '10/10' in terminal.getvalue()
  assert 'loss=0.25' in terminal.getvalue()
  other = _Log()
  with metrics.ProgressBar(10, 'train', file=other, process_index=1) as bar:
    bar.update(10, loss=0.25)
  assert not other.getvalue()


def test_saved_residuals_by_hand():
  x = jnp.ones((3, 4))
  # d/dx sin(x) = cos(x): the backward keeps cos(x), 12 float32 values.
  saved = metrics.saved_residuals(lambda x: jnp.sin(x).sum(), x)
  assert [n for n, _ in saved] == [48]
  assert 'output of cos' in saved[0][1]
  # x' y: the backward keeps y (for x's cotangent) and x' = bfloat16(x)
  # (for y's), 12 bfloat16 values each.
  y = jnp.ones((3, 4), jnp.bfloat16)
  saved = metrics.saved_residuals(
      lambda y, x: (x.astype(jnp.bfloat16) * y).sum(), y, x)
  assert [n for n, _ in saved] == [24, 24]
  assert 'argument y' in saved[0][1]
  assert 'convert_element_type' in saved[1][1]
  # Under jax.checkpoint nothing inside is kept: only the argument.
  sin2 = lambda x: jnp.sin(jnp.sin(x)).sum()
  assert len(metrics.saved_residuals(sin2, x)) == 2  # Both cosines.
  kept = metrics.saved_residuals(jax.checkpoint(sin2), x)
  assert [(n, 'argument' in d) for n, d in kept] == [(48, True)]
