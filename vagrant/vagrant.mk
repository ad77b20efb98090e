# Vagrant targets (include from the Makefile: `include vagrant/vagrant.mk`). Need vagrant and a provider
# (libvirt with the vagrant-libvirt plugin, or VirtualBox) on the host; see vagrant/README.md.
VAGRANT ?= vagrant
VAGRANT_DIR := vagrant

.PHONY: vagrant-up vagrant-e2e vagrant-destroy

vagrant-up:
	cd $(VAGRANT_DIR) && $(VAGRANT) up

vagrant-e2e:
	cd $(VAGRANT_DIR) && $(VAGRANT) rsync && $(VAGRANT) provision --provision-with image,nodeagent,e2e

vagrant-destroy:
	cd $(VAGRANT_DIR) && $(VAGRANT) destroy -f
