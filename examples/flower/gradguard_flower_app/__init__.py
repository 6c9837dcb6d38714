"""GradGuard on Flower: 3 hospitals train a chest X-ray classifier on PneumoniaMNIST, sharing only protected updates."""
