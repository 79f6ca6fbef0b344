"""Everything behind `star profile data|model|step|all|flops` (and its alias `star smoke`).

* :mod:`star.profiling.cli` - the one entry: options, routing, orchestration over ranks;
* :mod:`star.profiling.data` - the data loader's images/s per rank and overall;
* :mod:`star.profiling.model` - forward + backward of the model on synthetic images, and the
  one-pass check of a registry model (`star profile model --model NAME`, `star smoke`);
* :mod:`star.profiling.step` - the DeepSpeed training step on real batches, built by
  ``star.train.runtime.build_training`` as training builds it;
* :mod:`star.profiling.machine` - machine description and the peak-TFLOP/s table (MFU);
* :mod:`star.profiling.timing` - stage timers (CUDA events or synchronised clocks), peak memory;
* :mod:`star.profiling.report` - the rich table, the wall-time projection, JSON.

FLOPs are counted analytically in :mod:`star.flops` (`star profile flops` prints its table).
"""
