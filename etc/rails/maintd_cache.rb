# frozen_string_literal: true

# maintd — copy into config/initializers/ of a Rails 6.1+ app whose cache store is :mem_cache_store (Dalli).
#
# Why: Rails.cache.clear on a :mem_cache_store sends flush_all to every memcached server, so it empties every other
# app's cache too. maintd's `memcached.flush = "namespace"` instead increments one key per app
# (`memcached.namespace_key`, default "<app>:cache-version"); this file puts every entry the app reads or writes
# under that key's current value, so after maintd's flush step the app never again reads an entry cached before it,
# and other apps on the same servers keep theirs.
#
# Set MAINTD_CACHE_KEY to the same string as memcached.namespace_key, where the app's environment is set:
#   Apache + Passenger:  SetEnv MAINTD_CACHE_KEY shop:cache-version          (in the VirtualHost; needs mod_env)
#   nginx + Passenger:   passenger_env_var MAINTD_CACHE_KEY shop:cache-version;
#   Puma under systemd:  Environment=MAINTD_CACHE_KEY=shop:cache-version
# Without it (development, test), this file does nothing.
#
# How: ActiveSupport calls a Proc given as the store's `namespace:` for every key it builds. The Proc here returns a
# value remembered for the current unit of work: the version is read from memcached at most once per request, per
# job and per console command (Rails' executor starts each request and each job; the console's commands are
# wrapped below), and not at all by one that never touches the cache. A missing or non-integer value is 0; with
# memcached unreachable the unit of work runs uncached, as Rails itself does (a namespace nothing was ever written
# under, so nothing stale can be read). Dalli's own `namespace` option is not used: Rails 6.1 keeps that option to
# itself, and a Dalli namespace Proc would be called for every key, one memcached round trip each.
#
# Rails.cache.clear increments the same key on every server instead of flushing them: it clears this app's cache
# only.

module MaintdCache
  KEY = ENV.fetch("MAINTD_CACHE_KEY", "")
  SLOT = :maintd_cache_namespace

  # Rails.cache.clear: this app's entries only, by the same increment maintd's flush step makes, on every server
  # (Dalli reads the key from another server when its own is down: one left behind would bring old entries back).
  module ClearOwnEntries
    def clear(_options = nil)
      MaintdCache.forget
      servers = @data.with { |client| client.instance_variable_get(:@servers) }
      servers.each do |server|
        one = Dalli::Client.new(server)
        one.add(MaintdCache::KEY, "0", 0, raw: true)
        one.incr(MaintdCache::KEY, 1)
      rescue Dalli::DalliError => e
        logger&.error("MaintdCache: #{MaintdCache::KEY} not incremented on #{server} (#{e.class}: #{e.message})")
      ensure
        one&.close
      end
      nil
    end
  end

  # The console has no executor around each command: each command read at once, as a request would.
  module ConsoleCommand
    def evaluate(*args, **options)
      MaintdCache.forget
      super
    end
  end

  class << self
    def install(app)
      store = Rails.cache
      return unless KEY != "" && store.is_a?(ActiveSupport::Cache::MemCacheStore)

      client = store.instance_variable_get(:@data) # the store's own Dalli client (or pool): same servers, same options
      own = store.options[:namespace]
      store.options[:namespace] = lambda do
        [own.respond_to?(:call) ? own.call : own, current(client)].compact.join(":")
      end
      store.singleton_class.prepend(ClearOwnEntries)
      app.executor.to_run { MaintdCache.forget }
      app.executor.to_complete { MaintdCache.forget }
      app.console { IRB::Context.prepend(ConsoleCommand) if defined?(IRB::Context) }
    end

    def forget
      Thread.current[SLOT] = nil
    end

    private

    def current(client)
      Thread.current[SLOT] ||= "#{KEY}:#{version(client)}"
    end

    def version(client)
      value = client.with { |c| c.get(KEY, raw: true) }
      value.to_s.match?(/\A\d+\z/) ? value.to_i : 0
    rescue Dalli::DalliError
      "unreachable-#{SecureRandom.hex(8)}"
    end
  end
end

MaintdCache.install(Rails.application)
