"""Probes: what is linearly decodable at a site, beside the controls that keep it honest.

- :mod:`~mechscope.probe.linear` — L2 logistic-regression probes, penalty chosen on validation;
- :mod:`~mechscope.probe.control` — control tasks (random labels per input type), selectivity,
  shuffled labels;
- :mod:`~mechscope.probe.mdl` — the online code (minimum description length) probe, in bits;
- :mod:`~mechscope.probe.sparse` — k-sparse probes with several neuron rankings.

The rows a probe trains on come from :func:`mechscope.core.collect.activations`.
"""
