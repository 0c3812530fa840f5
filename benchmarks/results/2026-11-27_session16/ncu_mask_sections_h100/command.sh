# What ran (fresh H100, build 1cd2cdf): scripts/ncu_detect_mask_sections.sh of that commit, since
# folded into scripts/ncu_detect_sections.sh; the same run today is
bash scripts/ncu_detect_sections.sh 32x1 'pit_detect_mask|reduce|fusion' 2 > ncu_mask_sections.txt
