"""Control: steering directions, adding and ablating them, and representation finetuning.

- :mod:`~mechscope.steer.directions` — difference of means, contrastive pairs, ActAdd, RepE PCA, probe;
- :mod:`~mechscope.steer.apply` — adding a direction at sites and positions; directional ablation;
- :mod:`~mechscope.steer.orthogonalize` — the equivalent permanent weight edit;
- :mod:`~mechscope.steer.reft` — LoReFT and DiReFT interventions, trained with the model frozen;
- :mod:`~mechscope.steer.baselines` — prompting, LoRA (``peft``) and full finetuning, for the same table.
"""
