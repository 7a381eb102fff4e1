# maintd's plugin for Capistrano 3: Capistrano builds the release, maintd switches it (maintd contract §8).
#
# Copy this file into the app's lib/capistrano/tasks/ (the default Capfile imports every *.rake there), or import
# it from where `make install` put it:  import "/usr/local/share/maintd/capistrano/maintd.rake"
#
# `cap STAGE deploy` runs Capistrano's own flow up to deploy:updated (the code in releases/<timestamp>, the shared
# links, bundler, assets). Then, in place of deploy:symlink:release, on every server of :maintd_roles, it writes
# maintd's marker into the release and follows maintd's deploy, step by step; cap fails, naming the server, the
# step and the reason, when maintd refuses, fails or rolls back the release anywhere. deploy:cleanup,
# deploy:cleanup_rollback and deploy:log_revision are maintd's business (its keep_releases and revisions.log).
# `cap STAGE deploy:rollback` is a maintd rollback: to the previous release, or to ROLLBACK_RELEASE.
#
# Settings: :maintd_roles (default :app), :maintctl (the command on the servers, default "maintctl"; "sudo maintctl"
# works), :maintd_config or :maintd_socket (which app's maintd, when a server has several). The user Capistrano
# logs in as must be allowed to deploy: root, or a member of maintd's control.group.
require "json"
require "shellwords"

module Maintd
  # What maintd answered when it did not take a release live, with the server it came from.
  class Failed < StandardError; end

  module_function

  # maintctl's command line on a server, as SSHKit's `execute` and `capture` take it. SSHKit joins its arguments
  # with spaces and hands them to a shell, unquoted: every word is quoted here, so a REASON= with a `;` in it is
  # text, not a command.
  def command(*args)
    program, *words = Shellwords.split(fetch(:maintctl))
    where = if fetch(:maintd_socket) then ["--socket", fetch(:maintd_socket)]
            elsif fetch(:maintd_config) then ["--config", fetch(:maintd_config)]
            else []
            end
    [program.to_sym, *(words + where + args.map(&:to_s)).map(&:shellescape)]
  end

  # maintctl on one server, from inside an `on` block (its output shown as it comes, or captured); maintctl's
  # reason for a non-zero exit (its stderr) becomes Maintd::Failed, naming the server.
  def run(backend, host, *args, capture: false)
    backend.public_send(capture ? :capture : :execute, *command(*args))
  rescue SSHKit::Command::Failed => e
    reason = e.message[/stderr: (.*)\z/m, 1].to_s.strip.sub(/\Amaintctl: /, "")
    raise Failed, "maintd on #{host}: #{reason.empty? ? e.message : reason}"
  end

  # The server's maintd's upload settings (marker, require_marker), from `maintctl status --json`.
  def upload_settings(backend, host)
    JSON.parse(run(backend, host, "status", "--json", capture: true)).fetch("upload")
  end
end

namespace :load do
  task :defaults do
    set_if_empty :maintd_roles, :app
    set_if_empty :maintctl, "maintctl"
    set_if_empty :maintd_config, nil
    set_if_empty :maintd_socket, nil
  end
end

namespace :maintd do
  desc "Check that maintd answers on every server, and say so where it would not wait for the marker"
  task :check do
    on roles(fetch(:maintd_roles)) do |host|
      next if Maintd.upload_settings(self, host)["require_marker"]

      warn "maintd on #{host} runs with upload.require_marker = false: a release Capistrano is still building " \
           "can go live once it sits quiet for upload.quiet_period; set upload.require_marker = true"
    end
  end

  desc "Hand the release Capistrano built to maintd: write the marker, follow maintd's deploy step by step"
  task :switch do
    on roles(fetch(:maintd_roles)) do |host|
      marker = Maintd.upload_settings(self, host)["marker"]
      execute :touch, release_path.join(marker).to_s.shellescape
      Maintd.run(self, host, "deploy", release_path.basename, "--follow", "--wait")
    end
  end

  desc "Roll back through maintd: to the previous release, or to ROLLBACK_RELEASE"
  task :rollback do
    on roles(fetch(:maintd_roles)) do |host|
      Maintd.run(self, host, "rollback", *[ENV["ROLLBACK_RELEASE"]].compact, "--follow", "--wait")
    end
  end

  desc "Turn maintenance on: the 503 page, with REASON= and UNTIL= shown on it"
  task :lock do
    options = { "--reason" => ENV["REASON"], "--until" => ENV["UNTIL"] }.reject { |_, value| value.to_s.empty? }
    on roles(fetch(:maintd_roles)) do |host|
      Maintd.run(self, host, "maintenance", "on", *options.flatten)
    end
  end

  # The seed's other recipes, each one maintctl command on every server.
  {
    unlock: ["Turn maintenance off", %w[maintenance off]],
    restart: ["Restart the app on the live release", %w[restart]],
    flush: ["Flush memcached", %w[flush]],
    status: ["Show maintd's status on every server", %w[status]]
  }.each do |name, (description, args)|
    desc description
    task name do
      on roles(fetch(:maintd_roles)) do |host|
        Maintd.run(self, host, *args)
      end
    end
  end
end

# Capistrano's own switch, clean-up and revision log give way to maintd's.
%w[deploy:symlink:release deploy:cleanup deploy:cleanup_rollback deploy:log_revision].each do |name|
  Rake::Task[name].clear_actions
end
# maintd picks the release to roll back to; Capistrano's pick (`ls -xt releases/`) would go by modification time.
Rake::Task["deploy:revert_release"].clear_prerequisites

namespace :deploy do
  namespace :symlink do
    task :release do
      invoke fetch(:deploying) ? "maintd:switch" : "maintd:rollback"
    end
  end
end

after "deploy:check", "maintd:check"
