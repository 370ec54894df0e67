"""Reinforcement learning with verifiable rewards: tasks, reward functions, GRPO."""
