"""The MTKD-RL agent as a service: a Ray actor owning the policy (``reference`` and ``reinforce``
rules) and the learner's proxy of it.

Importing this package needs no Ray; :mod:`services.agent.actor` and :mod:`services.agent.proxy` do.
"""
