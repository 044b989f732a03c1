"""mtkd: multi-teacher knowledge distillation with a reinforcement-learning agent (MTKD-RL).

The library is plain PyTorch and numpy: it never imports Ray or gRPC.
"""
__version__ = "0.1.0"
