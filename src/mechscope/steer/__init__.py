"""Control: steering directions, adding and ablating them, and representation finetuning.

- :mod:`~mechscope.steer.directions` — difference of means, contrastive pairs, ActAdd, RepE PCA, probe
  (``find_direction`` picks one by name);
- :mod:`~mechscope.steer.effects` — what using a direction does: KL on the next-token distributions
  and a target token's probability;
- :mod:`~mechscope.steer.apply` — adding a direction at sites and positions; directional ablation;
- :mod:`~mechscope.steer.orthogonalize` — the equivalent permanent weight edit;
- :mod:`~mechscope.steer.reft` — LoReFT and DiReFT interventions, trained with the model frozen;
- :mod:`~mechscope.steer.baselines` — prompting, LoRA (``peft``) and full finetuning, for the same table
  (``reft_alone``: one ReFT intervention scored like a row of it).
"""
