"""Operations on a stored run that span several store calls: resume, answers, fork."""
