"""The cohort: the slide sheet, tasks (sheet labels -> classes) and the synthetic demo cohort."""
