module leakkeys

go 1.16
