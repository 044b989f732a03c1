"""The student's training loop as a Ray Train worker loop, and its launcher."""
