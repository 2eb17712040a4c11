"""cai: turn a written constitution into preference data and a DPO-trained policy, round by round."""

__version__ = "0.1.0"
