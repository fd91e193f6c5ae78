"""hwsim: a simulated pod speaking the real protocols on loopback (SNMP, Modbus, NVML)."""
