"""Training machinery shared by every stage: state, optimizer, the step."""
