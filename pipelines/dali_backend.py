"""DALI backend: the pixel work of every pipeline as one DALI graph.

Inputs arrive through ``external_source`` (JPEG bytes read via the shard indexes, plus the
decisions of ``pipelines.sampling``), so order and augmentation are exact and resumable; the
graph holds no random operator. That is why it uses ``decoders.image_slice`` with given
windows rather than ``decoders.image_random_crop`` and ``readers.webdataset``: their RNG and
reader state would need a saved DALI checkpoint to resume, and their order depends on the
shard layout. Per sample:

    decoders.image_slice  decode only the crop window (nvJPEG with device="mixed" on GPU,
                          libjpeg-turbo with "cpu", fast IDCT when training)
    resize                to S x S, cubic (or linear), antialiased
    RandAugment           fine-tuning only: timm's rand-m9-mstd0.5-inc1 (or "star_v1") with
                          DALI operators, selected by the given op indices and arguments
    crop_mirror_normalize flip and HWC -> CHW, still uint8

Normalisation (and random erasing) run in torch on the training device: that sends a quarter
of the bytes over PCIe and costs nothing on a GPU. On the CPU (pretraining and evaluation) the
graph stops after decoding and ``pipelines.torch_resize`` resizes, flips and normalises in one
pass per image, while DALI decodes the next batches. An epoch ends after ``steps_per_epoch``
runs; there is no DALI reader, hence no ``reader_name``: the plan, not the reader, knows the
epoch length, and the feeder raises StopIteration past it.
"""

from __future__ import annotations

import importlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from pipelines import rand_augment
from pipelines.loader import HostBatch, Loader
from pipelines.sampling import MAGNITUDE_BINS, EpochPlan
from pipelines.shards import CorruptSampleError, as_array
from pipelines.torch_resize import resize_normalize


def dali_available() -> bool:
    try:
        importlib.import_module("nvidia.dali")
    except ImportError:
        return False
    return True


class _Feeder:
    """``external_source`` callback: host batches for steps start.. of one plan, in order.

    DALI calls it from ``pipe.run()`` on the training thread; the next step's host batch (file
    reads, decisions) is prepared meanwhile on a helper thread, off that critical path.
    """

    def __init__(self, loader: DaliLoader, plan: EpochPlan, start_step: int):
        self.loader = loader
        self.retarget(plan, start_step)

    def retarget(self, plan: EpochPlan, start_step: int) -> None:
        self.plan, self.next_step = plan, start_step
        self.pending: deque[HostBatch] = deque()  # fed to DALI, output not yet taken
        self.ahead: Future | None = None  # host batch of next_step, being prepared

    def _prepare(self, step: int) -> Future | None:
        if step >= self.plan.steps:
            return None
        return self.loader._host_pool.submit(self.loader.host_batch, self.plan, step)

    def __call__(self):
        if self.next_step >= self.plan.steps:
            raise StopIteration
        ahead = self.ahead or self._prepare(self.next_step)
        host = ahead.result()  # re-raises CorruptSampleError here, on the training thread
        self.next_step += 1
        self.ahead = self._prepare(self.next_step)
        self.pending.append(host)
        ps = host.params
        outputs = [
            [as_array(j) for j in host.jpegs],
            [np.array(p.window[:2], dtype=np.float32) for p in ps],
            [np.array(p.window[2:], dtype=np.float32) for p in ps],
        ]
        if self.loader.torch_resize:  # the graph only decodes the windows
            return tuple(outputs)
        outputs += [
            [np.array(p.flip, dtype=np.int32) for p in ps],
            # resize ROI in (y, x) order, the spatial order of HWC
            [np.array(_roi(p)[1::-1], dtype=np.float32) for p in ps],
            [np.array(_roi(p)[:1:-1], dtype=np.float32) for p in ps],
        ]
        cfg = self.loader.augment
        if cfg.rand_augment and cfg.randaug == "timm":
            layers = [[rand_augment.dali_layer(o, a, g, cfg.image_size)
                       for o, a, g in zip(p.ra_ops, p.ra_applied, p.ra_args)] for p in ps]
            outputs += [[np.array([k for k, _, _ in ls], dtype=np.int32) for ls in layers],
                        [np.array([g for _, g, _ in ls], dtype=np.float32) for ls in layers],
                        [np.array([m for _, _, m in ls], dtype=np.float32).reshape(-1, 2, 3) for ls in layers]]
        elif cfg.rand_augment:
            outputs += [[np.array(p.ra_ops, dtype=np.int32) for p in ps],
                        [np.array(p.ra_bins, dtype=np.int32) for p in ps],
                        [np.array(p.ra_signs, dtype=np.int32) for p in ps]]
        return tuple(outputs)


class DaliLoader(Loader):
    """One DALI graph per loader, reused across epochs; read one epoch iterator at a time."""

    backend = "dali"

    def __init__(self, *args, prefetch: int = 2, cpu_resize: str = "torch", **kwargs):
        super().__init__(*args, **kwargs)
        if cpu_resize not in ("torch", "dali"):
            raise ValueError(f"cpu_resize {cpu_resize!r}: use 'torch' (fast on CPU) or 'dali'")
        self.prefetch = prefetch
        self.decode_device = "mixed" if self.device.type == "cuda" else "cpu"
        # On CPU DALI's resize costs several times the crop decode; torch's
        # vectorised uint8 antialiased resize is much faster. RandAugment needs the resized
        # image inside the graph, so fine-tuning keeps DALI's resize.
        self.torch_resize = (self.decode_device == "cpu" and cpu_resize == "torch"
                             and not self.augment.rand_augment)
        # the calling thread takes a share too, so num_threads threads resize in all
        self._pool = ThreadPoolExecutor(self.num_threads - 1) if self.torch_resize and self.num_threads > 1 else None
        self._cached = None  # (pipeline, feeder) left at an epoch boundary, reusable
        self._host_pool = ThreadPoolExecutor(1)  # prepares the next host batch (see _Feeder)

    def _build(self, feeder: _Feeder):
        from nvidia.dali import pipeline_def

        cfg = self.augment
        device_id = None
        if self.device.type == "cuda":
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        pipe = pipeline_def(_graph, enable_conditionals=cfg.rand_augment)(
            feeder=feeder, cfg=cfg, decode_device=self.decode_device, decode_only=self.torch_resize,
            batch_size=self.batch_size, num_threads=self.num_threads, device_id=device_id,
            prefetch_queue_depth=self.prefetch)
        pipe.build()
        return pipe

    def _decode(self, plan: EpochPlan, start_step: int) -> Iterator[tuple[torch.Tensor, HostBatch]]:
        step, failures_at, started = start_step, {}, False
        while step < plan.steps:
            pipe, feeder = self._pipeline_at(plan, step)
            while step < plan.steps:
                try:
                    (out,) = pipe.run()
                except StopIteration:
                    raise RuntimeError(f"DALI ended epoch {plan.epoch} at step {step} of {plan.steps}") from None
                except CorruptSampleError:  # raised by the feeder, already names the sample
                    self._cached = None
                    raise
                except RuntimeError as error:
                    # The pipeline is unusable now: find the sample DALI choked on, record it
                    # (or raise, naming it), and rebuild from this step without it.
                    self._cached = None
                    self._find_corrupt(feeder, error)
                    failures_at[step] = failures_at.get(step, 0) + 1
                    if failures_at[step] > 2:
                        raise
                    break
                host = feeder.pending.popleft()
                self._cached = None  # a consumer that stops mid-epoch leaves it mid-epoch
                yield self._to_torch(out, host), host
                self._cached, started = (pipe, feeder), True
                step += 1
        if started and self._cached is not None:
            try:  # the feeder ran dry during prefetch: take DALI's end-of-epoch, keep the graph
                self._cached[0].run()
                self._cached = None
            except StopIteration:
                pass

    def _pipeline_at(self, plan: EpochPlan, step: int):
        """The cached graph (building one takes seconds with RandAugment) or a new one."""
        if self._cached is not None:
            pipe, feeder = self._cached
            feeder.retarget(plan, step)
            pipe.reset()
            return pipe, feeder
        feeder = _Feeder(self, plan, step)
        self._cached = (self._build(feeder), feeder)
        return self._cached

    def _find_corrupt(self, feeder: _Feeder, error: RuntimeError) -> None:
        from pipelines.pil_ops import decode

        found = False
        for host in feeder.pending:
            for slot, data in enumerate(host.jpegs):
                index = int(host.indices[slot])
                if index in self._bad:
                    continue
                try:
                    decode(data)
                except Exception as e:  # PIL raises several types on broken data
                    found = True
                    self.mark_corrupt(index, f"DALI and PIL cannot decode it ({type(e).__name__}: {e})")
        if not found:
            steps = [h.step for h in feeder.pending]
            raise RuntimeError(f"DALI failed on steps {steps} of epoch {feeder.plan.epoch} and PIL "
                               f"decodes every sample there: {error}") from error

    def _to_torch(self, out, host: HostBatch) -> torch.Tensor:
        if self.torch_resize:
            # Views into DALI's buffers: safe because they are consumed before the next run().
            crops = [np.asarray(out[i]) for i in range(len(out))]
            return resize_normalize(crops, host.params, self.image_size, self.augment.interpolation,
                                    self._scale, self._shift, self._pool)
        if self.decode_device == "mixed":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dense = out.as_tensor()
            target = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(dense, target, cuda_stream=torch.cuda.current_stream(self.device))
            return target
        return torch.from_numpy(np.array(out.as_tensor()))  # copy: DALI reuses its buffers


def _roi(p) -> tuple[float, float, float, float]:
    return p.roi or (0.0, 0.0, float(p.window[2]), float(p.window[3]))


def _graph(feeder: _Feeder, cfg, decode_device: str, decode_only: bool):
    """The DALI graph; a pure function of its inputs (no random operator)."""
    from nvidia.dali import fn, types

    size = cfg.image_size
    num_inputs = 3 if decode_only else 9 if cfg.rand_augment else 6  # RandAugment: 3 per-layer inputs
    inputs = fn.external_source(source=feeder, num_outputs=num_inputs, batch=True)
    jpegs, anchors, shapes = inputs[:3]
    # Fast integer IDCT on the CPU: up to 14 % faster, differences of a grey level or two,
    # irrelevant under training augmentation; evaluation keeps the accurate one.
    images = fn.decoders.image_slice(jpegs, anchors, shapes, axis_names="WH", normalized_anchor=False,
                                     normalized_shape=False, use_fast_idct=cfg.train,
                                     device=decode_device, output_type=types.RGB)
    if decode_only:  # HWC crops of varying size, resized in torch (pipelines.torch_resize)
        return images
    flips, roi_start, roi_end = inputs[3:6]
    interp = types.INTERP_CUBIC if cfg.interpolation == "cubic" else types.INTERP_LINEAR
    images = fn.resize(images, resize_x=size, resize_y=size, interp_type=interp, antialias=True,
                       roi_start=roi_start, roi_end=roi_end)
    if cfg.rand_augment and cfg.randaug == "timm":
        images = _timm_rand_augment(images, *inputs[6:], n=cfg.rand_augment_n,
                                    fill=rand_augment.fill_colour(cfg.mean), on_gpu=decode_device == "mixed")
    elif cfg.rand_augment:
        images = _rand_augment(images, *inputs[6:], n=cfg.rand_augment_n, size=size)
    return fn.crop_mirror_normalize(images, mirror=flips, dtype=types.UINT8, output_layout="CHW")


def _timm_rand_augment(images, kinds, args, matrices, *, n: int, fill, on_gpu: bool):
    """timm's RandAugment (``pipelines.rand_augment``) with the given per-layer op kind
    (``rand_augment.DALI_KINDS``, 0 = not applied), scalar argument and affine matrix."""
    from nvidia.dali import types
    from nvidia.dali.auto_aug.core._select import select
    from nvidia.dali.pipeline import do_not_convert

    suite = [do_not_convert(op) for op in _timm_suite(np.array(fill, dtype=np.float32))]
    blur = types.Constant(np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13)
    ident = types.Constant(np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=np.float32))
    for level in range(n):
        arg = args[level]
        # PIL's Sharpness blends the SMOOTH-filtered image with the image: one 3x3 kernel
        kernel = blur * (1.0 - arg) + ident * arg
        arg_data = arg.gpu() if on_gpu else arg  # operands of arithmetic with the images
        kernel = kernel.gpu() if on_gpu else kernel
        images = select(suite, kinds[level], images, arg=arg, arg_data=arg_data, kernel=kernel,
                        matrix=matrices[level])
    return images


def _timm_suite(fill: np.ndarray) -> list:
    """One function per entry of ``rand_augment.DALI_KINDS``, same order."""
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import augmentations as aa

    def identity(data, **_):
        return data

    def affine(data, matrix, **_):
        # DALI's warps have no bicubic and one fill value: shift by the fill colour, warp
        # bilinear with fill 0, shift back. inverse_map=True: matrix maps output -> input (PIL).
        # The matrix is a named argument: argument inputs stay on the CPU, also for GPU images.
        centre = types.Constant(fill)
        out = fn.warp_affine(fn.cast(data, dtype=types.FLOAT) - centre, matrix=matrix, fill_value=0.0,
                             interp_type=types.INTERP_LINEAR, inverse_map=True)
        return fn.cast(out + centre, dtype=types.UINT8)

    def auto_contrast(data, **_):
        return aa.auto_contrast.op(data, None)

    def equalize(data, **_):
        return fn.equalize(data)

    def invert(data, **_):
        return aa.invert.op(data, None)

    def posterize(data, arg_data, **_):  # the argument is the AND mask here
        return data & fn.cast(arg_data, dtype=types.UINT8)

    def solarize(data, arg_data, **_):
        return aa.solarize.op(data, arg_data)

    def solarize_add(data, arg_data, **_):
        return aa.solarize_add.op(data, fn.cast(arg_data, dtype=types.UINT8))

    def color(data, arg, **_):
        return fn.saturation(data, saturation=arg)

    def contrast(data, arg_data, **_):
        return aa.contrast.op(data, arg_data)

    def brightness(data, arg, **_):
        return fn.brightness(data, brightness=arg)

    def sharpness(data, kernel, **_):
        return fn.filter(data, kernel)

    suite = [identity, affine, auto_contrast, equalize, invert, posterize, solarize, solarize_add,
             color, contrast, brightness, sharpness]
    assert len(suite) == len(rand_augment.DALI_KINDS)
    return suite


def _rand_augment(images, ops, bins, signs, *, n: int, size: int):
    """The "star_v1" RandAugment: DALI's suite applied with externally chosen ops, bins and signs."""
    from nvidia.dali.auto_aug import rand_augment
    from nvidia.dali.auto_aug.core import signed_bin
    from nvidia.dali.auto_aug.core._select import select
    from nvidia.dali.pipeline import do_not_convert

    # Only the op selection needs AutoGraph (an `if` on per-sample data); converting every
    # augmentation's internals too makes building the graph take many seconds.
    suite = [do_not_convert(_CURRENT_OPS().get(aug.name, aug))
             for aug in rand_augment.get_rand_augment_suite(use_shape=True)]
    for level in range(n):
        images = select(suite, ops[level], data=images, magnitude_bin=signed_bin(bins[level], signs[level]),
                        num_magnitude_bins=MAGNITUDE_BINS, shape=(size, size), fill_value=128)
    return images


def _CURRENT_OPS() -> dict:
    """DALI 2.4's suite still calls fn.experimental.filter / equalize, which warn on every
    build; the same augmentations on the operators' current names."""
    from nvidia.dali import fn
    from nvidia.dali.auto_aug import augmentations as aa
    from nvidia.dali.auto_aug.core import augmentation

    @augmentation(mag_range=(0, 0.9), randomly_negate=True, mag_to_param=aa.sharpness_kernel,
                  param_device="auto")
    def sharpness(data, kernel):
        return fn.filter(data, kernel)

    @augmentation
    def equalize(data, _):
        return fn.equalize(data)

    return {"sharpness": sharpness, "equalize": equalize}
