"""The backdoor suite: poisoning transforms (``attack=``), backdoor metrics (CACC, ASR), the gradient-control
training rule for PEFT backdoors, and how an attack and a defense (``defense=``) are wired into one run.

Modules (imported where they are used, so that the config schemas can import :mod:`.config` without
pulling in the data package):

- :mod:`lightmods.attacks.config`: the ``attack`` and ``defense`` schemas and their cross-checks;
- :mod:`lightmods.attacks.poison`: BadNets, AddSent and file-based (style-transfer) poisoning;
- :mod:`lightmods.attacks.metrics`: ``val/cacc`` and ``val/asr``;
- :mod:`lightmods.attacks.gradient_control`: cross-layer magnitude control and conflict removal;
- :mod:`lightmods.attacks.suite`: :class:`BackdoorSuite`, the one object ``lightmods.run`` talks to.
"""
