from data_prep.commands import entry

entry()
