"""The student's side on Ray: the driver (``driver.py``), the Ray Train worker loop
(``train_loop.py``), the run events they exchange and the learners' collectives."""
