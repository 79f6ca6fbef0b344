"""Throughput profiling behind `star profile model|step|all`.

* :mod:`star.profiling.machine` - machine description and the peak-TFLOP/s table (MFU);
* :mod:`star.profiling.timing` - stage timers (CUDA events or synchronised clocks), peak memory;
* :mod:`star.profiling.model` - forward + backward of the model on synthetic images;
* :mod:`star.profiling.step` - the DeepSpeed training step on real batches;
* :mod:`star.profiling.report` - the rich table, the wall-time projection, JSON;
* :mod:`star.profiling.cli` - options and orchestration over ranks.

FLOPs are counted analytically in :mod:`star.flops`.
"""
