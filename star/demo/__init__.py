"""`star demo`: the whole pipeline end to end on CPU, with plots.

* :mod:`star.demo.run` - the stages (real `star` commands as subprocesses), the summary, ``main``;
* :mod:`star.demo.plots` - the figures, drawn from what the stages wrote.
"""
